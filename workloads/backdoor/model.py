"""ConvNet-mini for 8x8 digits, its loss, and the victim's training recipe (``workloads.torch_train``).

conv3x3(1->32)-ReLU-avgpool -> conv3x3(32->32)-ReLU-avgpool -> Linear(128->64)-ReLU ->
Linear(64->10). ``hidden`` (the 128->64 Linear) is the penultimate weight layer that
DOORPING's neuron selection looks at; its ReLU output is the penultimate feature the
server's defenses inspect. No normalisation layers (as the paper's ConvNet default).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workloads.torch_train import full_batch, minibatches, set_params, train_steps

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


def from_parameters(params: Params) -> ConvNetMini:
    return set_params(ConvNetMini(), params)


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch (here: the whole set)."""
    return F.cross_entropy(model(x), y)


def train_full_batch(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
    weight_decay: float = 5e-4, decay_at: float = 0.5, proximal_mu: float = 0.0,
) -> nn.Module:
    """The paper's evaluation protocol on a small synthetic set: full-batch SGD (momentum
    0.9, weight decay 5e-4), the step size divided by 10 after ``decay_at`` of the epochs;
    FedProx's term when ``proximal_mu > 0``. Trains on the model's device."""
    decay = int(epochs * decay_at)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    batches = minibatches((xt, yt), full_batch(), next(model.parameters()).device)
    return train_steps(
        model, loss, batches, steps=epochs, proximal_mu=proximal_mu,
        optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=weight_decay),
        scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: 0.1 if epoch >= decay else 1.0),
    )


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Clean test accuracy (CTA) on (x, y)."""
    return float((predict(model, x) == y).mean())


def attack_success(model: nn.Module, x_triggered: np.ndarray, y: np.ndarray, target: int) -> float:
    """ASR as the paper defines it: the fraction of triggered test images of the *other*
    classes classified as ``target``."""
    keep = y != target
    return float((predict(model, x_triggered[keep]) == target).mean())


def attack_success_all(model: nn.Module, x_triggered: np.ndarray, target: int) -> float:
    """ASR as the paper's code computes it: the fraction of *all* triggered test images,
    the target class's own included, classified as ``target`` (about a tenth above the
    paper's ASR when the target class stays the target)."""
    return float((predict(model, x_triggered) == target).mean())
