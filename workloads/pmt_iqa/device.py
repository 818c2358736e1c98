"""PMT-IQA's device files: one client's rated patches in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``patches`` | (n, 1, s, s) float32 | grey patches in [0, 1] (s: the scenario's ``iqa.patch_size``) |
| ``scores`` | (n,) float | each patch's quality score in [0, 100] (the proxy here; a user's ratings on a device) |

No distortion family (the hidden group) and no distortion type: a device's clients are
clustered by what they train on, and the server's per-distortion metrics use its own test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import DeviceDataError, by_client, check_shape, client_id, offsets, read_npz

FORMAT = ("one .npz per client: client_id (int scalar), patches (n, 1, s, s) float32 in [0, 1] "
          "(s = iqa.patch_size), scores (n,) float quality scores in [0, 100]")


def device_files(data: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``PatchCohort`` as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        out.append((int(cid), {"client_id": np.int64(cid), "patches": data.patches[lo:hi].astype(np.float32),
                               "scores": data.scores[lo:hi].astype(np.float32)}))
    return out


def read_client(path: Path, num_clients: int, size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(client id, patches, scores) of one file; ``DeviceDataError`` names the file and the problem."""
    f = read_npz(path, {"client_id": 0, "patches": 4, "scores": 1})
    cid = client_id(path, f, num_clients)
    patches, scores = f["patches"], f["scores"]
    check_shape(path, "patches", patches, (None, 1, size, size))
    n = len(patches)
    if n == 0:
        raise DeviceDataError(f"{path}: 'patches' holds no images")
    check_shape(path, "scores", scores, (n,))
    if patches.min() < 0 or patches.max() > 1:  # check_shape has checked they are finite numbers
        raise DeviceDataError(f"{path}: 'patches' must be grey values in [0, 1]")
    if scores.min() < 0 or scores.max() > 100:
        raise DeviceDataError(f"{path}: 'scores' must be quality scores in [0, 100]")
    return cid, patches.astype(np.float32), scores.astype(np.float32)


def read_device_files(files: list[Path], num_clients: int, size: int) -> dict[str, np.ndarray]:
    """A device's clients, sorted by id: the fields of a ``PatchCohort`` by name (no groups)."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients, size) for p in paths])
    return dict(client_ids=np.array([c[0] for c in clients], np.int64),
                patches=np.concatenate([c[1] for c in clients]), scores=np.concatenate([c[2] for c in clients]),
                starts=offsets([len(c[1]) for c in clients]), groups=None)
