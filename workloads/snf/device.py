"""SNF pruning's device files: one client's digits in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``images`` | (n, 1, 8, 8) float32 | the client's digits, pixels in [0, 1] (upsampled and distorted on use) |
| ``targets`` | (n,) int | each digit's class (0-9) |
| ``validation`` | (n,) bool | the digits kept for scoring the search's candidates (at least one, not all) |

``umbel data export`` writes the exact split of a simulated federation (``split_federation``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import (
    DeviceDataError, by_client, check_classes, check_shape, client_id, offsets, read_npz,
)

FORMAT = ("one .npz per client: client_id (int scalar), images (n, 1, 8, 8) float32 in [0, 1], targets (n,) "
          "int 0-9, validation (n,) bool (the digits that score the search's candidates; at least one, not all)")
CLASSES = 10


def device_files(data: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``DigitsCohort`` as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        vlo, vhi = int(data.val_starts[j]), int(data.val_starts[j + 1])
        images = np.concatenate([data.images[lo:hi], data.val_images[vlo:vhi]])
        targets = np.concatenate([data.targets[lo:hi], data.val_targets[vlo:vhi]])
        validation = np.concatenate([np.zeros(hi - lo, bool), np.ones(vhi - vlo, bool)])
        out.append((int(cid), {"client_id": np.int64(cid), "images": images.astype(np.float32),
                               "targets": targets.astype(np.int64), "validation": validation}))
    return out


def read_client(path: Path, num_clients: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(client id, images, targets, validation flags) of one file; ``DeviceDataError`` names
    the file and the problem."""
    f = read_npz(path, {"client_id": 0, "images": 4, "targets": 1, "validation": 1})
    cid = client_id(path, f, num_clients)
    images, targets, validation = f["images"], f["targets"], f["validation"]
    check_shape(path, "images", images, (None, 1, 8, 8))
    n = len(images)
    check_shape(path, "targets", targets, (n,))
    check_shape(path, "validation", validation, (n,))
    if n and (images.min() < 0 or images.max() > 1):
        raise DeviceDataError(f"{path}: 'images' pixels lie in [{images.min():g}, {images.max():g}]; "
                              "expected [0, 1] (the digits divided by 16)")
    if n:
        check_classes(path, "targets", targets, CLASSES)
    if validation.dtype != bool:
        raise DeviceDataError(f"{path}: 'validation' holds {validation.dtype}; expected bool")
    if not validation.any() or validation.all():
        raise DeviceDataError(f"{path}: 'validation' must mark at least one digit and leave at least one "
                              f"for training ({int(validation.sum())} of {n} marked)")
    return cid, images.astype(np.float32), targets.astype(np.int64), validation


def read_device_files(files: list[Path], num_clients: int) -> dict[str, np.ndarray]:
    """A device's clients, sorted by id: the fields of a ``DigitsCohort`` by name."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients) for p in paths])
    train = [(c[1][~c[3]], c[2][~c[3]]) for c in clients]
    val = [(c[1][c[3]], c[2][c[3]]) for c in clients]
    return dict(client_ids=np.array([c[0] for c in clients], np.int64),
                images=np.concatenate([t[0] for t in train]), targets=np.concatenate([t[1] for t in train]),
                starts=offsets([len(t[1]) for t in train]),
                val_images=np.concatenate([v[0] for v in val]), val_targets=np.concatenate([v[1] for v in val]),
                val_starts=offsets([len(v[1]) for v in val]))
