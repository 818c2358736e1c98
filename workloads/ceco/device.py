"""CeCo segmentation's device files: one client's scenes in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``images`` | (n, 1, s, s) float32 | the client's greyscale scenes (s: the scenario's ``ceco.image_size``), finite |
| ``masks`` | (n, s, s) int | each pixel's class, 0-5 (background, disk, square, ellipse, diamond, ring) |

No scene type (the hidden group): ``umbel data export`` writes the exact scenes of a
simulated federation, and a device's clients are clustered by what they train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import DeviceDataError, by_client, check_classes, check_shape, client_id, offsets, read_npz

FORMAT = ("one .npz per client: client_id (int scalar), images (n, 1, s, s) float32 (s = ceco.image_size), "
          "masks (n, s, s) int classes 0-5 (background, disk, square, ellipse, diamond, ring)")


def device_files(data: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``SceneCohort`` as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        out.append((int(cid), {"client_id": np.int64(cid), "images": data.images[lo:hi].astype(np.float32),
                               "masks": data.masks[lo:hi].astype(np.int64)}))
    return out


def read_client(path: Path, num_clients: int, size: int, classes: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(client id, images, masks) of one file; ``DeviceDataError`` names the file and the problem."""
    f = read_npz(path, {"client_id": 0, "images": 4, "masks": 3})
    cid = client_id(path, f, num_clients)
    images, masks = f["images"], f["masks"]
    check_shape(path, "images", images, (None, 1, size, size))
    n = len(images)
    if n == 0:
        raise DeviceDataError(f"{path}: 'images' holds no scenes")
    check_shape(path, "masks", masks, (n, size, size))
    check_classes(path, "masks", masks, classes)
    return cid, images.astype(np.float32), masks.astype(np.int64)


def read_device_files(files: list[Path], num_clients: int, size: int, classes: int) -> dict[str, np.ndarray]:
    """A device's clients, sorted by id: the fields of a ``SceneCohort`` by name (no groups)."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients, size, classes) for p in paths])
    return dict(client_ids=np.array([c[0] for c in clients], np.int64),
                images=np.concatenate([c[1] for c in clients]), masks=np.concatenate([c[2] for c in clients]),
                starts=offsets([len(c[1]) for c in clients]), groups=None)
