"""Koopman's device files: one client's Burgers trajectories in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``fields`` | (n, steps + 1, grid) float32 | n trajectories, each the field at t = 0, T/steps, ..., T on the client's own grid (any size with ``grid >= 2 * modes``) |
| ``viscosity`` | () float, optional | the client's ν: written, and required, only when ``koopman.viscosity_channel = true`` (the model then reads it) |
| ``cluster`` | () int, optional | the viscosity group: only in ``umbel data export --labels`` files, for tests |

Real devices know neither their group nor, unless the model needs it, their viscosity: the
cohort's ``labels`` are then None (no misclustering in the record) and its viscosities NaN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workloads.device_files import (
    DeviceDataError, by_client, check_shape, client_id, optional_cluster, read_npz,
)

FORMAT = ("one .npz per client: client_id (int scalar), fields (n, steps + 1, grid) float32 (trajectories "
          "from t = 0 to T on the client's grid), viscosity (float scalar, only with "
          "koopman.viscosity_channel = true); no viscosity group")


def device_files(data: Any, viscosity_channel: bool) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``BurgersCohort`` as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        arrays = {"client_id": np.int64(cid), "fields": np.ascontiguousarray(data.client(j), np.float32)}
        if viscosity_channel:
            arrays["viscosity"] = np.float64(data.viscosity[j])
        out.append((int(cid), arrays))
    return out


def read_client(path: Path, num_clients: int, snapshots: int, modes: int, groups: int,
                viscosity_channel: bool) -> tuple[int, np.ndarray, float, int | None]:
    """(client id, trajectories, viscosity or NaN, group or None) of one file;
    ``DeviceDataError`` names the file and the problem."""
    f = read_npz(path, {"client_id": 0, "fields": 3})
    cid = client_id(path, f, num_clients)
    fields = f["fields"]
    check_shape(path, "fields", fields, (None, None, None))
    n, steps, grid = fields.shape
    if n == 0:
        raise DeviceDataError(f"{path}: 'fields' holds no trajectories")
    if steps != snapshots:
        raise DeviceDataError(f"{path}: 'fields' has {steps} snapshots per trajectory; this scenario's "
                              f"koopman.steps needs {snapshots} (t = 0 to T)")
    if grid < 2 * modes:
        raise DeviceDataError(f"{path}: a {grid}-point grid is too coarse for koopman.modes = {modes} "
                              f"(needs at least {2 * modes} points)")
    nu = float("nan")
    if "viscosity" in f:
        v = f["viscosity"]
        if v.shape != () or not np.issubdtype(v.dtype, np.number) or not (np.isfinite(v) and v > 0):
            raise DeviceDataError(f"{path}: 'viscosity' must be a positive number (a scalar), got {v!r}")
        nu = float(v)
    elif viscosity_channel:
        raise DeviceDataError(f"{path}: missing 'viscosity': koopman.viscosity_channel = true gives the "
                              "model each client's ν")
    return cid, fields.astype(np.float32), nu, optional_cluster(path, f, groups)


def read_device_files(files: list[Path], num_clients: int, snapshots: int, modes: int, groups: int,
                      viscosity_channel: bool) -> dict[str, Any]:
    """A device's clients, sorted by id, as the arguments of ``koopman._pack``: ids, labels
    (None unless every file has ``cluster``), viscosities, grids, counts, flat fields."""
    paths = [Path(p) for p in files]
    clients = by_client(paths, [read_client(p, num_clients, snapshots, modes, groups, viscosity_channel)
                                for p in paths])
    labels = [c[3] for c in clients]
    return {
        "ids": np.array([c[0] for c in clients], np.int64),
        "labels": None if None in labels else np.array(labels, np.int64),
        "viscosity": np.array([c[2] for c in clients], np.float64),
        "grids": np.array([c[1].shape[2] for c in clients], np.int64),
        "counts": np.array([c[1].shape[0] for c in clients], np.int64),
        "parts": [c[1].ravel() for c in clients],
        "snapshots": snapshots,
    }
