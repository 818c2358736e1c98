"""Active learning's device files: one client's digits pool in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``images`` | (n, 1, 8, 8) float32 | the client's pool, pixels in [0, 1] |
| ``targets`` | (n,) int | each image's class (0-9): the device's oracle, revealed to training only when queried |
| ``labeled`` | (n,) bool | the seed set, labeled before round 1 (at least one image) |
| ``budget`` | () int | labels the client reveals per query cycle |

``umbel data export`` writes the exact pools, seed sets and budgets of a simulated
federation (``split_federation``); a device may hold any pool of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import (
    DeviceDataError, by_client, check_classes, check_shape, client_id, offsets, read_npz, scalar_int,
)

FORMAT = ("one .npz per client: client_id (int scalar), images (n, 1, 8, 8) float32 in [0, 1], targets (n,) "
          "int 0-9 (the device's oracle), labeled (n,) bool (the seed set), budget (int scalar: labels per "
          "query cycle)")
CLASSES = 10


def device_files(data: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``DigitsCohort`` as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        out.append((int(cid), {
            "client_id": np.int64(cid), "images": data.images[lo:hi], "targets": data.targets[lo:hi],
            "labeled": data.seed_set[lo:hi], "budget": np.int64(data.budget[j]),
        }))
    return out


def read_client(path: Path, num_clients: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, int]:
    """(client id, images, targets, seed set, budget) of one file; ``DeviceDataError`` names
    the file and the problem."""
    f = read_npz(path, {"client_id": 0, "images": 4, "targets": 1, "labeled": 1, "budget": 0})
    cid = client_id(path, f, num_clients)
    images, targets, labeled = f["images"], f["targets"], f["labeled"]
    check_shape(path, "images", images, (None, 1, 8, 8))
    n = len(images)
    if n == 0:
        raise DeviceDataError(f"{path}: the pool holds no images")
    check_shape(path, "targets", targets, (n,))
    check_shape(path, "labeled", labeled, (n,))
    if images.min() < 0 or images.max() > 1:
        raise DeviceDataError(f"{path}: 'images' pixels lie in [{images.min():g}, {images.max():g}]; "
                              "expected [0, 1] (the digits divided by 16)")
    check_classes(path, "targets", targets, CLASSES)
    if labeled.dtype != bool:
        raise DeviceDataError(f"{path}: 'labeled' holds {labeled.dtype}; expected bool")
    if not labeled.any():
        raise DeviceDataError(f"{path}: 'labeled' marks no image: a client starts with at least one label")
    budget = scalar_int(path, f, "budget", 0, None)
    return cid, images.astype(np.float32), targets.astype(np.int64), labeled, budget


def read_device_files(files: list[Path], num_clients: int) -> tuple[np.ndarray, ...]:
    """A device's clients, sorted by id: (client ids, images, targets, pool offsets, seed
    set, budgets), the fields of a ``DigitsCohort``."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients) for p in paths])
    return (np.array([c[0] for c in clients], np.int64), np.concatenate([c[1] for c in clients]),
            np.concatenate([c[2] for c in clients]), offsets([len(c[1]) for c in clients]),
            np.concatenate([c[3] for c in clients]), np.array([c[4] for c in clients], np.int64))
