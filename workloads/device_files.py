"""Device data files: one client's local data in one file (``umbel data export`` writes
them; a SuperNode's ``data-path`` names them). Each workload documents its own format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


class DeviceDataError(ValueError):
    """The device's data file is missing, unreadable or does not fit the scenario."""


def read_npz(path: Path, required: dict[str, int]) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file, with the ``required`` keys at the given number of
    dimensions. Names the file and what is wrong: unreadable, truncated, missing keys."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise DeviceDataError(f"{path}: not a readable .npz file (truncated or corrupt?): {err}") from None
    for key, ndim in required.items():
        if key not in arrays:
            raise DeviceDataError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
        if arrays[key].ndim != ndim:
            raise DeviceDataError(
                f"{path}: {key!r} has shape {arrays[key].shape}; expected {ndim} dimension(s)"
            )
    return arrays
