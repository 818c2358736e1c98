"""Digits for the backdoor workload: the split, each client's shard, the trigger patch.

Images are scikit-learn's bundled 8x8 digits scaled to [0, 1] and z-normalised with the
training set's mean and standard deviation (a scalar pair, as the paper's pipeline
normalises per channel). Every function is pure in (seed, sizes), so a cohort of any size
sees the same shard for the same client.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from workloads import streams
from workloads.digits import digits

NUM_CLASSES = 10
SIDE = 8
STREAM_SPLIT = streams.BACKDOOR_SPLIT
STREAM_POISON = streams.BACKDOOR_POISON
STREAM_TRIGGER = streams.BACKDOOR_TRIGGER


@dataclass(frozen=True)
class Digits:
    """The normalised train and test images, and the normalised value of pixels 0 and 1."""

    x_train: np.ndarray  # (N, 1, 8, 8) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    low: float  # a black pixel after normalisation
    high: float  # a white pixel after normalisation


@lru_cache(maxsize=4)
def load(seed: int, test_size: int) -> Digits:
    """A seeded train/test split of the 1797 digits, normalised on the train part."""
    images, labels = digits()
    if not 0 < test_size < len(labels) - NUM_CLASSES:
        raise ValueError(f"backdoor.test_size = {test_size} must be in 1..{len(labels) - NUM_CLASSES - 1}")
    order = np.random.default_rng(np.random.SeedSequence([seed, STREAM_SPLIT])).permutation(len(labels))
    test, train = order[:test_size], order[test_size:]
    mean, std = float(images[train].mean()), float(images[train].std())
    norm = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return Digits(x_train=norm(images[train]), y_train=labels[train], x_test=norm(images[test]),
                  y_test=labels[test], low=(0.0 - mean) / std, high=(1.0 - mean) / std)


def shards(num_train: int, clients: int, seed: int) -> list[np.ndarray]:
    """An IID split of the training images into ``clients`` shards of near-equal size."""
    order = np.random.default_rng(np.random.SeedSequence([seed, STREAM_SPLIT, 1])).permutation(num_train)
    return [np.sort(part) for part in np.array_split(order, clients)]


def patch_mask(size: int, side: int = SIDE) -> np.ndarray:
    """The trigger's mask: a ``size`` x ``size`` square one pixel from the bottom-right
    corner, rows and columns [side - 1 - size, side - 1) (the paper's placement)."""
    if not 0 < size < side - 1:
        raise ValueError(f"trigger size {size} must be in 1..{side - 2} for {side}x{side} images")
    mask = np.zeros((1, side, side), np.float32)
    mask[:, side - 1 - size:side - 1, side - 1 - size:side - 1] = 1.0
    return mask


def stamp(x: np.ndarray, mask: np.ndarray, trigger: np.ndarray) -> np.ndarray:
    """``x * (1 - mask) + mask * trigger``: the trigger pasted into every image."""
    return (x * (1 - mask) + mask * trigger).astype(np.float32)


def poison_index(num: int, portion: float, seed: int, client: int) -> np.ndarray:
    """Positions in a shard of ``num`` images that a malicious client poisons (at least one)."""
    count = max(1, int(round(portion * num)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_POISON, client]))
    return np.sort(rng.choice(num, size=min(count, num), replace=False))
