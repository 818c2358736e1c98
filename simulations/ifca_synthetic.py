"""IFCA's synthetic federation (Ghosh et al. 2020) written as a data folder.

m machines in p clusters of m/p, n points each: x ~ N(0, I_d), y = <x, theta_j> + N(0, sigma^2),
theta_j = r * Bernoulli(1/2)^d. The folder holds one ``.npz`` per machine in mixed
regression's device format and ``truth.npz`` (``models``, ``labels``), so a scenario runs on
it as on a user's own data (``data.folder``, ``data.truth = "truth.npz"``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRUTH_FILE = "truth.npz"
STREAM = 7919  # this generator's own seed tag (not a platform stream: the folder is the data)


def success_line(sigma: float) -> float:
    """IFCA's success: the mean distance of the learned models to their nearest true model
    (``nearest_error``) below 0.6 sigma + 0.001."""
    return 0.6 * sigma + 0.001


def write_ifca_folder(folder: Path, seed: int, r: float, m: int = 200, p: int = 4, n: int = 100,
                      d: int = 1000, sigma: float = 0.1) -> np.ndarray:
    """IFCA's synthetic data as a data folder; returns the true models (p, d)."""
    if m % p:
        raise ValueError(f"{m} machines do not split into {p} clusters of equal size")
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM]))
    models = r * rng.integers(0, 2, size=(p, d)).astype(np.float64)
    labels = np.repeat(np.arange(p), m // p)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(m - 1))
    for i in range(m):
        x = rng.standard_normal((n, d))
        y = x @ models[labels[i]] + sigma * rng.standard_normal(n)
        np.savez(folder / f"client-{i:0{width}d}.npz", client_id=np.int64(i), x=x, y=y)
    np.savez(folder / TRUTH_FILE, models=models, labels=labels.astype(np.int64))
    return models
