"""ConvNet-mini for 8x8 digits, its parameters as numpy arrays, and the victim's training.

conv3x3(1->32)-ReLU-avgpool -> conv3x3(32->32)-ReLU-avgpool -> Linear(128->64)-ReLU ->
Linear(64->10). ``hidden`` (the 128->64 Linear) is the penultimate weight layer that
DOORPING's neuron selection looks at; its ReLU output is the penultimate feature the
server's defenses inspect. No normalisation layers (as the paper's ConvNet default).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Params = dict[str, np.ndarray]
NUM_CLASSES = 10


class ConvNetMini(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.hidden = nn.Linear(width * 4, hidden)
        self.out = nn.Linear(hidden, NUM_CLASSES)

    def pre_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate Linear's output before its ReLU (DOORPING's neuron values)."""
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.hidden(x.flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: what activation clustering and spectral signatures read."""
        return F.relu(self.pre_hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def fresh(seed: int) -> ConvNetMini:
    """Torch's default initialisation under a seeded generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ConvNetMini()


def get_parameters(model: nn.Module) -> Params:
    return {n: p.detach().numpy().astype(np.float32).copy() for n, p in model.named_parameters()}


def set_parameters(model: nn.Module, params: Params) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(params[name]), dtype=torch.float32))
    return model


def from_parameters(params: Params) -> ConvNetMini:
    return set_parameters(ConvNetMini(), params)


def train_full_batch(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
    weight_decay: float = 5e-4, decay_at: float = 0.5,
) -> nn.Module:
    """The paper's evaluation protocol on a small synthetic set: full-batch SGD (momentum
    0.9, weight decay 5e-4), the step size divided by 10 after ``decay_at`` of the epochs."""
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    for epoch in range(epochs):
        if epoch == int(epochs * decay_at):
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Clean test accuracy (CTA) on (x, y)."""
    return float((predict(model, x) == y).mean())


def attack_success(model: nn.Module, x_triggered: np.ndarray, y: np.ndarray, target: int) -> float:
    """ASR: the fraction of triggered test images of the other classes classified as
    ``target``."""
    keep = y != target
    return float((predict(model, x_triggered[keep]) == target).mean())
