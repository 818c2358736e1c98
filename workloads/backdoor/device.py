"""The backdoor workload's device files: one client's digits shard in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``images`` | (n, 1, 8, 8) float32 | the client's shard, normalised as the scenario's training split: (pixel / 16 - mean) / std |
| ``targets`` | (n,) int | each image's class (0-9) |

Which clients attack is the scenario's (``backdoor.malicious``, a simulated attack), never
the file's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import DeviceDataError, by_client, check_classes, check_shape, client_id, offsets, read_npz

FORMAT = ("one .npz per client: client_id (int scalar), images (n, 1, 8, 8) float32 normalised as the "
          "scenario's training split, targets (n,) int 0-9")
CLASSES = 10
SLACK = 1e-4  # normalised pixels lie in [low, high], up to rounding


def device_files(data: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``Shards`` cohort as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        images, targets = data.shard(j)
        out.append((int(cid), {"client_id": np.int64(cid), "images": images, "targets": targets}))
    return out


def read_client(path: Path, num_clients: int, low: float, high: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(client id, images, targets) of one file; ``DeviceDataError`` names the file and the
    problem. ``low``/``high``: the normalised values of a black and a white pixel."""
    f = read_npz(path, {"client_id": 0, "images": 4, "targets": 1})
    cid = client_id(path, f, num_clients)
    images, targets = f["images"], f["targets"]
    check_shape(path, "images", images, (None, 1, 8, 8))
    if len(images) == 0:
        raise DeviceDataError(f"{path}: the shard holds no images")
    check_shape(path, "targets", targets, (len(images),))
    if images.min() < low - SLACK or images.max() > high + SLACK:
        raise DeviceDataError(f"{path}: 'images' values lie in [{images.min():g}, {images.max():g}]; normalised "
                              f"pixels lie in [{low:g}, {high:g}] (raw pixels? normalise them as the scenario does)")
    check_classes(path, "targets", targets, CLASSES)
    return cid, images.astype(np.float32), targets.astype(np.int64)


def read_device_files(files: list[Path], num_clients: int, low: float, high: float) -> tuple[np.ndarray, ...]:
    """A device's clients, sorted by id: (client ids, images, targets, shard offsets)."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients, low, high) for p in paths])
    return (np.array([c[0] for c in clients], np.int64), np.concatenate([c[1] for c in clients]),
            np.concatenate([c[2] for c in clients]), offsets([len(c[1]) for c in clients]))
