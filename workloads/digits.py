"""scikit-learn's bundled 8x8 digits, shared by the workloads that train on them (offline)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 images in [0, 1] as (N, 1, 8, 8) float32, and their classes (0-9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    # copied after [:, None]: canonical strides, so torch's convolutions take the same path for
    # these images in memory and memory-mapped (a view's channel axis reads as channels-last)
    images = (data.images / 16.0).astype(np.float32)[:, None].copy()
    return images, data.target.astype(np.int64)
