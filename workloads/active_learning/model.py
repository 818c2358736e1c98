"""The digits CNN, its parameters as numpy arrays, and local training (plain torch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Params = dict[str, np.ndarray]
NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """Conv(1->16) -> Conv(16->32) -> max-pool -> Linear(512->10) on 8x8 grey digits.

    No batch norm or dropout, so train and eval mode compute the same function (the paper
    scores in eval mode; here that needs no care).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def initial_parameters(seed: int) -> Params:
    """Torch's default initialisation under a seeded generator (same seed, same model)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsCNN()
    return get_parameters(model)


def get_parameters(model: nn.Module) -> Params:
    return {n: p.detach().numpy().astype(np.float32) for n, p in model.named_parameters()}


def set_parameters(model: nn.Module, params: Params) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(params[name]), dtype=torch.float32))


def train_one(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    proximal_mu: float,
    rng: np.random.Generator,
) -> None:
    """``steps`` Adam steps on minibatches drawn epoch by epoch from a seeded shuffle.

    A fresh optimiser per call (per round), as FedAvg clients usually do; FedProx adds
    (mu/2)||w - w_start||^2 to the loss.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    n = len(targets)
    order: np.ndarray = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) == 0:
            order = rng.permutation(n)
        batch, order = order[:batch_size], order[batch_size:]
        idx = torch.from_numpy(batch)
        loss = F.cross_entropy(model(images[idx]), targets[idx])
        if anchor is not None:
            loss = loss + 0.5 * proximal_mu * sum(
                ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
