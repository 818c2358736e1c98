"""CCGC's device files: one client's subgraph in one ``.npz``.

| array | shape, type | holds |
| --- | --- | --- |
| ``client_id`` | () int | the client's id in the scenario, in ``[0, clients)`` |
| ``features`` | (n, d) float32 | the raw features of the client's n nodes; d is the scenario's feature dimension |
| ``edges`` | (2, m) int64 | the edges among the client's own nodes, as local indices ``0 .. n-1`` (row i of ``features``); each undirected edge once, in either direction (repeats and self-loops are ignored) |
| ``node_ids`` | (n,) int64 | the nodes' ids in the whole graph (distinct): how the server's evaluator matches them to its truth |

No class labels: the device smooths its own features (``Â^t X`` over its subgraph, as in
simulation) and trains without them; scoring is the server's. ``umbel data export`` writes
the exact subgraphs of a simulated federation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from workloads.ccgc.data import clean_adjacency
from workloads.device_files import DeviceDataError, by_client, check_shape, client_id, read_npz

FORMAT = ("one .npz per client: client_id (int scalar), features (n, d) float32 (the nodes' raw features), "
          "edges (2, m) int64 (edges among the client's nodes as local indices 0..n-1, each once), node_ids "
          "(n,) int64 (distinct ids in the whole graph); no class labels")


@dataclass(frozen=True)
class DeviceSubgraph:
    """One client's file, read and checked: what ``local_features`` smooths."""

    client_id: int
    node_ids: np.ndarray  # (n,) int64
    features: np.ndarray  # (n, d) float32
    adjacency: sp.csr_matrix  # (n, n) symmetric, 0/1, no self-loops


def device_files(data: Any, adjacency: sp.csr_matrix) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Each client of a ``GraphCohort`` as (client id, the arrays of its file): its nodes'
    ids and raw features, and the edges among them in the whole graph's ``adjacency`` (the
    subgraph it smooths, ``client_subgraph``), each undirected edge once (upper triangle)."""
    out = []
    for j, cid in enumerate(data.client_ids):
        nodes = np.asarray(data.node_ids[data.rows(j)], np.int64)
        upper = sp.triu(adjacency[nodes][:, nodes], k=1).tocoo()
        out.append((int(cid), {
            "client_id": np.int64(cid), "features": np.ascontiguousarray(data.features[data.rows(j)], np.float32),
            "edges": np.stack([upper.row, upper.col]).astype(np.int64).reshape(2, -1), "node_ids": nodes,
        }))
    return out


def read_client(path: Path, num_clients: int, feature_dim: int, num_nodes: int) -> DeviceSubgraph:
    """One file's subgraph; ``DeviceDataError`` names the file and the problem."""
    f = read_npz(path, {"client_id": 0, "features": 2, "edges": 2, "node_ids": 1})
    cid = client_id(path, f, num_clients)
    features, edges, node_ids = f["features"], f["edges"], f["node_ids"]
    check_shape(path, "features", features, (None, None))
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise DeviceDataError(f"{path}: 'features' holds {features.dtype}; expected real numbers (float32)")
    n = len(features)
    if n == 0:
        raise DeviceDataError(f"{path}: 'features' holds no nodes")
    if features.shape[1] != feature_dim:
        raise DeviceDataError(f"{path}: 'features' has {features.shape[1]} columns; this scenario's feature "
                              f"dimension is {feature_dim}")
    check_shape(path, "node_ids", node_ids, (n,))
    if not np.issubdtype(node_ids.dtype, np.integer):
        raise DeviceDataError(f"{path}: 'node_ids' holds {node_ids.dtype}; expected integers")
    if node_ids.min() < 0 or node_ids.max() >= num_nodes:
        raise DeviceDataError(f"{path}: 'node_ids' must lie in the graph's 0..{num_nodes - 1}, got "
                              f"{node_ids.min()}..{node_ids.max()}")
    if len(np.unique(node_ids)) != n:
        raise DeviceDataError(f"{path}: 'node_ids' names a node twice")
    check_shape(path, "edges", edges, (2, None))
    if not np.issubdtype(edges.dtype, np.integer):
        raise DeviceDataError(f"{path}: 'edges' holds {edges.dtype}; expected integer node indices")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise DeviceDataError(f"{path}: 'edges' must hold local node indices 0..{n - 1} (rows of 'features'), "
                              f"got {edges.min()}..{edges.max()}")
    pairs = edges.astype(np.int64)
    adjacency = clean_adjacency(sp.coo_matrix((np.ones(pairs.shape[1], np.float32), (pairs[0], pairs[1])),
                                              shape=(n, n)), n)
    return DeviceSubgraph(cid, node_ids.astype(np.int64), features.astype(np.float32), adjacency)


def read_device_files(files: list[Path], num_clients: int, feature_dim: int,
                      num_nodes: int) -> list[DeviceSubgraph]:
    """A device's subgraphs, sorted by client id (distinct clients, and no node in two files)."""
    paths = [Path(p) for p in files]
    read = [read_client(p, num_clients, feature_dim, num_nodes) for p in paths]
    by_client(paths, [(s.client_id,) for s in read])
    held = np.concatenate([s.node_ids for s in read])
    ids, counts = np.unique(held, return_counts=True)
    if (counts > 1).any():
        node = int(ids[np.argmax(counts > 1)])
        holders = [str(p) for p, s in zip(paths, read) if node in s.node_ids]
        raise DeviceDataError(f"{holders[-1]}: node {node} is also in {holders[0]} (a node belongs to one client)")
    return sorted(read, key=lambda s: s.client_id)
