"""MGTAB's device files: one client's subgraph, with its users' labels, in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``features`` | (n, d) float32 | the features of the client's n users (20 properties + text dimensions); d is the scenario's width |
| ``node_ids`` | (n,) int64 | the users' ids in the whole graph (distinct): how the server's evaluator matches them |
| ``y_bot`` | (n,) int64 | bot labels, 0 human / 1 bot |
| ``y_stance`` | (n,) int64 | stance labels, 0 neutral / 1 against / 2 support |
| ``split`` | (n,) int8 | 0 train / 1 validation / 2 test: a device trains on its split-0 users only |
| ``edges`` | (2, m) int64 | the relations among the client's own users, as local indices ``0 .. n-1`` (rows of ``features``), each undirected edge once |
| ``edge_type`` | (m,) int64 | each edge's relation, 0..6 in MGTAB's order (followers, friends, mention, reply, quoted, url, hashtag) |

A supervised workload: the device needs its users' labels to train. No behaviour group (the
hidden cluster): ``umbel data export`` writes the exact subgraphs of a simulated federation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workloads.device_files import DeviceDataError, by_client, check_classes, check_shape, client_id, read_npz
from workloads.mgtab.data import RELATIONS

FORMAT = ("one .npz per client: client_id (int scalar), features (n, d) float32, node_ids (n,) int64 (distinct ids "
          "in the whole graph), y_bot (n,) 0/1, y_stance (n,) 0-2, split (n,) 0 train / 1 val / 2 test, edges "
          "(2, m) int64 (local indices 0..n-1, each undirected edge once), edge_type (m,) relations 0-6")
KEYS = {"client_id": 0, "features": 2, "node_ids": 1, "y_bot": 1, "y_stance": 1, "split": 1, "edges": 2,
        "edge_type": 1}


def device_files(data) -> list[tuple[int, dict[str, np.ndarray]]]:  # data: workloads.mgtab.AccountCohort
    """Each client of a cohort as (client id, the arrays of its file)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        rows, edges = data.rows(j), data.edge_rows(j)
        out.append((int(cid), {
            "client_id": np.int64(cid), "features": np.ascontiguousarray(data.features[rows], np.float32),
            "node_ids": np.asarray(data.node_ids[rows], np.int64), "y_bot": np.asarray(data.y_bot[rows], np.int64),
            "y_stance": np.asarray(data.y_stance[rows], np.int64), "split": np.asarray(data.split[rows], np.int8),
            "edges": np.asarray(data.edges[:, edges], np.int64).reshape(2, -1),
            "edge_type": np.asarray(data.edge_type[edges], np.int64),
        }))
    return out


def read_client(path: Path, num_clients: int, feature_dim: int, num_nodes: int) -> dict[str, np.ndarray]:
    """One file's arrays, checked; ``DeviceDataError`` names the file and the problem."""
    f = read_npz(path, KEYS)
    cid = client_id(path, f, num_clients)
    features = f["features"]
    check_shape(path, "features", features, (None, feature_dim))
    n = len(features)
    if n == 0:
        raise DeviceDataError(f"{path}: 'features' holds no users")
    for key in ("node_ids", "y_bot", "y_stance", "split"):
        check_shape(path, key, f[key], (n,))
    node_ids = f["node_ids"]
    if not np.issubdtype(node_ids.dtype, np.integer) or node_ids.min() < 0 or node_ids.max() >= num_nodes:
        raise DeviceDataError(f"{path}: 'node_ids' must be integers in the graph's 0..{num_nodes - 1}")
    if len(np.unique(node_ids)) != n:
        raise DeviceDataError(f"{path}: 'node_ids' names a user twice")
    check_classes(path, "y_bot", f["y_bot"], 2)
    check_classes(path, "y_stance", f["y_stance"], 3)
    check_classes(path, "split", f["split"], 3)
    if not (f["split"] == 0).any():
        raise DeviceDataError(f"{path}: no training users (split 0): the device has nothing to train on")
    edges = f["edges"]
    check_shape(path, "edges", edges, (2, None))
    m = edges.shape[1]
    check_shape(path, "edge_type", f["edge_type"], (m,))
    if m:
        if not np.issubdtype(edges.dtype, np.integer) or edges.min() < 0 or edges.max() >= n:
            raise DeviceDataError(f"{path}: 'edges' must hold local user indices 0..{n - 1} (rows of 'features')")
        check_classes(path, "edge_type", f["edge_type"], len(RELATIONS))
    return {"client_id": np.int64(cid), "features": features.astype(np.float32), "node_ids": node_ids.astype(np.int64),
            "y_bot": f["y_bot"].astype(np.int64), "y_stance": f["y_stance"].astype(np.int64),
            "split": f["split"].astype(np.int8), "edges": edges.astype(np.int64).reshape(2, -1),
            "edge_type": f["edge_type"].astype(np.int64)}


def read_device_files(files: list[Path], num_clients: int, feature_dim: int,
                      num_nodes: int) -> list[dict[str, np.ndarray]]:
    """A device's clients, sorted by id (distinct clients, and no user in two files)."""
    paths = [Path(p) for p in files]
    read = [read_client(p, num_clients, feature_dim, num_nodes) for p in paths]
    by_client(paths, [(int(r["client_id"]),) for r in read])
    held = np.concatenate([r["node_ids"] for r in read])
    ids, counts = np.unique(held, return_counts=True)
    if (counts > 1).any():
        user = int(ids[np.argmax(counts > 1)])
        holders = [str(p) for p, r in zip(paths, read) if user in r["node_ids"]]
        raise DeviceDataError(f"{holders[-1]}: user {user} is also in {holders[0]} (a user belongs to one client)")
    return sorted(read, key=lambda r: int(r["client_id"]))
