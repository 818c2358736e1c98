"""The digits CNN and its loss (plain torch; training in ``workloads.torch_train``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workloads.torch_train import get_params

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
    return get_params(model)


def loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The local objective: mean cross-entropy of a minibatch (FedProx's term is added by
    ``workloads.torch_train``)."""
    return F.cross_entropy(model(images), targets)
