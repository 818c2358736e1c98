"""SSTAM's device files: one video service's measured encodes in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``features`` | (n, 2, F) float | each encode's raw features (``data.measure``): saliency-weighted, then equal weights |
| ``ssim`` | (n,) float | each encode's luma SSIM against its source, in (0, 1] (the service has its masters) |

A device measures its own encodes with ``workloads.sstam.data.measure`` (the detectors, the
saliency model, and the temporal model the set stores: ``SSTAMSet.temporal_model()``), so no
video leaves it. No codec (the hidden group)
is stored: a device's clients are clustered by what they train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import DeviceDataError, by_client, check_shape, client_id, offsets, read_npz
from workloads.sstam.data import FEATURES

FORMAT = (f"one .npz per client: client_id (int scalar), features (n, 2, {len(FEATURES)}) float raw SSTAM "
          "features (saliency-weighted, then equal weights; columns " + ", ".join(FEATURES) + "), "
          "ssim (n,) float in (0, 1]")


def device_files(data: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``VideoCohort`` as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        out.append((int(cid), {"client_id": np.int64(cid), "features": np.asarray(data.features[lo:hi], np.float64),
                               "ssim": np.asarray(data.ssim[lo:hi], np.float64)}))
    return out


def read_client(path: Path, num_clients: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(client id, features, ssim) of one file; ``DeviceDataError`` names the file and the problem."""
    f = read_npz(path, {"client_id": 0, "features": 3, "ssim": 1})
    cid = client_id(path, f, num_clients)
    features, ssim = f["features"], f["ssim"]
    check_shape(path, "features", features, (None, 2, len(FEATURES)))
    n = len(features)
    if n == 0:
        raise DeviceDataError(f"{path}: 'features' holds no encodes")
    check_shape(path, "ssim", ssim, (n,))
    if features.min() < 0:
        raise DeviceDataError(f"{path}: 'features' must be non-negative (ratios, energies, probabilities)")
    if ssim.min() <= 0 or ssim.max() > 1:
        raise DeviceDataError(f"{path}: 'ssim' must lie in (0, 1]")
    return cid, features.astype(np.float64), ssim.astype(np.float64)


def read_device_files(files: list[Path], num_clients: int) -> dict[str, np.ndarray]:
    """A device's clients, sorted by id: the fields of a ``VideoCohort`` by name (no groups)."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients) for p in paths])
    return dict(client_ids=np.array([c[0] for c in clients], np.int64),
                features=np.concatenate([c[1] for c in clients]), ssim=np.concatenate([c[2] for c in clients]),
                starts=offsets([len(c[1]) for c in clients]), groups=None)
