"""The spec's "hard digits": scikit-learn's digits upsampled to 16x16 and distorted.

Distortions (``augment``): rotation within +-20 degrees, scale 0.8-1.2, shear +-0.2, shift
+-2 px (one affine warp, bilinear), a 5x5 patch blanked with probability 0.5, and Gaussian
noise of sd 0.2. Training images are distorted afresh at every step (seeded by seed, client
and round); a client's validation images and the server's test images are fixed views,
drawn once from (seed, client) and (seed) streams.

The split (``split_federation``): ``test_size`` originals are held out for the server (each
seen in ``test_views`` views); the rest is split over the clients by a per-class
Dirichlet(alpha), and each client keeps ``val_fraction`` of its pool (at least one image) as
its validation set, which only the width search reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from workloads import streams
from workloads.digits import digits

MIN_POOL = 4  # every client holds at least this many originals (>= 1 validation, >= 1 training)
SPLIT_ATTEMPTS = 100


class SplitError(ValueError):
    """The federation cannot be split as asked (names the scenario field to change)."""


def upsample(images8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, 1, 8, 8) -> (n, 1, 16, 16), bilinear."""
    x = torch.as_tensor(images8, dtype=torch.float32)
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh distortion of every (n, 1, 16, 16) image: affine warp, a blanked patch, noise."""
    n, _, h, w = images.shape
    if n == 0:
        return images
    u = torch.rand(n, 7, generator=generator)
    angle = (u[:, 0] * 2 - 1) * (20 * np.pi / 180)
    scale = 0.8 + 0.4 * u[:, 1]
    shear = (u[:, 2] * 2 - 1) * 0.2
    shift = (u[:, 3:5] * 2 - 1) * (2 * 2 / w)  # +-2 px in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear * cos
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos + shear * sin
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # a 5x5 patch blanked in half of the images
    blank = u[:, 5] < 0.5
    corners = torch.randint(0, h - 4, (n, 2), generator=generator)
    rows = torch.arange(h)
    inside_r = (rows[None] >= corners[:, :1]) & (rows[None] < corners[:, :1] + 5)
    inside_c = (rows[None] >= corners[:, 1:]) & (rows[None] < corners[:, 1:] + 5)
    patch = (inside_r[:, :, None] & inside_c[:, None, :]) & blank[:, None, None]
    out = out.masked_fill(patch[:, None], 0.0)
    return out + 0.2 * torch.randn(out.shape, generator=generator)


def generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a SeedSequence over ``key``."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] % (2**63))
    return torch.Generator().manual_seed(seed)


def fixed_views(images8: np.ndarray, views: int, *key: int) -> torch.Tensor:
    """``views`` distorted views of each image, drawn once from ``key`` (view-major)."""
    x = upsample(images8)
    g = generator(*key)
    return torch.cat([augment(x, g) for _ in range(views)]) if len(x) else x


@dataclass(frozen=True)
class Split:
    test: np.ndarray  # indices into digits() of the server's test originals
    train: tuple[np.ndarray, ...]  # per client: indices of its training originals
    val: tuple[np.ndarray, ...]  # per client: indices of its validation originals


@lru_cache(maxsize=8)
def split_federation(seed: int, clients: int, alpha: float, test_size: int, val_fraction: float) -> Split:
    """Hold out ``test_size`` originals; split the rest over ``clients`` by a per-class
    Dirichlet(alpha) (redrawn until every client holds ``MIN_POOL``); each client's
    validation set is ``max(1, round(val_fraction * pool))`` of its pool."""
    _, targets = digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams.SNF_SPLIT]))
    order = rng.permutation(len(targets))
    test, pool = np.sort(order[:test_size]), order[test_size:]
    if len(pool) < clients * MIN_POOL:
        raise SplitError(f"federation.clients: {clients} clients cannot each hold {MIN_POOL} of the "
                         f"{len(pool)} images left after snf.test_size")
    for _ in range(SPLIT_ATTEMPTS):
        owners = np.empty(len(pool), np.int64)
        for c in range(10):
            members = np.flatnonzero(targets[pool] == c)
            members = members[rng.permutation(len(members))]
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)[:-1]
            owners[members] = np.repeat(np.arange(clients), np.diff([0, *cuts, len(members)]))
        if np.bincount(owners, minlength=clients).min() >= MIN_POOL:
            break
    else:
        raise SplitError(f"snf.alpha: after {SPLIT_ATTEMPTS} Dirichlet draws some client still held "
                         f"fewer than {MIN_POOL} images (raise alpha or lower federation.clients)")
    train, val = [], []
    for i in range(clients):
        mine = pool[owners == i]
        mine = mine[np.random.default_rng(np.random.SeedSequence([seed, streams.SNF_SPLIT, i])).permutation(len(mine))]
        n_val = min(len(mine) - 1, max(1, int(round(val_fraction * len(mine)))))
        val.append(np.sort(mine[:n_val]))
        train.append(np.sort(mine[n_val:]))
    return Split(test, tuple(train), tuple(val))
