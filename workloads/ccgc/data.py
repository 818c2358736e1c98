"""Attributed graphs for CCGC: a seeded contextual SBM, the two real-data formats, and who
holds which nodes.

- ``contextual_sbm``: N nodes in K classes (mildly unbalanced priors), ``degree * N / 2``
  distinct undirected edges, each inside the class of its first end with probability
  ``homophily`` and otherwise to a node of another class (so ``homophily`` is the expected
  share of in-class edges), and features ``X = M[y] + N(0, I_d)`` with ``M_k ~ N(0, mu^2 I)``.
- ``load_planetoid`` (``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``, Cora/CiteSeer)
  and ``load_npy_graph`` (``<name>_{feat,label,adj}.npy``, the AMAP/BAT/EAT/UAT releases)
  read the paper's data when a user has the files; a bad file is named.
- ``split_nodes`` / ``client_subgraph``: a random node split (or one where each client
  holds only some classes); a client keeps the edges between its own nodes only.

Every graph is symmetric, binary and free of self-loops (CCGC's smoothing adds them back).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

PARTITIONS = ("random", "disjoint-classes")


class GraphDataError(ValueError):
    """A graph file that cannot be read as the format it claims; the message names it."""


@dataclass(frozen=True)
class AttributedGraph:
    features: np.ndarray  # (N, d) float32
    labels: np.ndarray  # (N,) int64 ground truth (scoring only; never used to train)
    adjacency: sp.csr_matrix  # (N, N) symmetric, 0/1, no self-loops

    @property
    def num_nodes(self) -> int:
        return len(self.labels)

    @property
    def num_edges(self) -> int:
        """Undirected edges."""
        return int(self.adjacency.nnz // 2)


def clean_adjacency(adjacency: sp.spmatrix | np.ndarray, nodes: int) -> sp.csr_matrix:
    """Symmetric 0/1 CSR without self-loops (edge weights and directions are dropped)."""
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    a = ((a + a.T) != 0).astype(np.float32).tolil()
    a.setdiag(0)
    a = a.tocsr()
    a.eliminate_zeros()
    if a.shape != (nodes, nodes):
        raise ValueError(f"adjacency of shape {a.shape} for {nodes} nodes")
    return a


# ---- the contextual stochastic block model ----------------------------------------------------


def class_priors(clusters: int, imbalance: float) -> np.ndarray:
    """Priors growing linearly from 1 to ``1 + imbalance`` (normalised): mildly unbalanced."""
    weights = 1.0 + imbalance * np.arange(clusters) / max(clusters - 1, 1)
    return weights / weights.sum()


def class_sizes(nodes: int, priors: np.ndarray) -> np.ndarray:
    """Integer sizes summing to ``nodes``, proportional to ``priors`` (largest remainders)."""
    exact = nodes * priors
    sizes = np.floor(exact).astype(np.int64)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: nodes - int(sizes.sum())]] += 1
    return sizes


def contextual_sbm(
    *, nodes: int, clusters: int, features: int, degree: float, homophily: float, mu: float,
    imbalance: float = 0.5, seed: int | np.random.SeedSequence = 0,
) -> AttributedGraph:
    """A seeded contextual SBM (module docstring). Edges are drawn until exactly
    ``round(degree * nodes / 2)`` distinct ones exist, so the mean degree is ``degree``."""
    if clusters < 2 or nodes < 2 * clusters:
        raise ValueError(f"need at least 2 clusters and 2 nodes per cluster, got {clusters} and {nodes}")
    if not 0 <= homophily <= 1:
        raise ValueError(f"homophily must lie in [0, 1], got {homophily}")
    target = int(round(degree * nodes / 2))
    if target > nodes * (nodes - 1) // 4:  # far denser than a sparse SBM: rejection would crawl
        raise ValueError(f"degree {degree} is too dense for {nodes} nodes")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(clusters), class_sizes(nodes, class_priors(clusters, imbalance))))
    members = [np.flatnonzero(labels == k) for k in range(clusters)]
    others = [np.flatnonzero(labels != k) for k in range(clusters)]
    edges: set[tuple[int, int]] = set()
    while len(edges) < target:
        batch = max(target - len(edges), 64)
        source = rng.integers(nodes, size=batch)
        inside = rng.random(batch) < homophily
        draw = rng.random(batch)
        for s, keep, u in zip(source.tolist(), inside.tolist(), draw.tolist()):
            pool = members[labels[s]] if keep else others[labels[s]]
            t = int(pool[int(u * len(pool))])
            if t != s:
                edges.add((min(s, t), max(s, t)))
            if len(edges) == target:
                break
    pairs = np.array(sorted(edges), dtype=np.int64).reshape(-1, 2)
    adjacency = sp.coo_matrix((np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(nodes, nodes))
    means = rng.normal(0.0, mu, size=(clusters, features))
    x = means[labels] + rng.standard_normal((nodes, features))
    return AttributedGraph(x.astype(np.float32), labels.astype(np.int64), clean_adjacency(adjacency, nodes))


def edge_homophily(graph: AttributedGraph) -> float:
    """Share of edges whose two ends share a class."""
    a = sp.triu(graph.adjacency, k=1).tocoo()
    return float(np.mean(graph.labels[a.row] == graph.labels[a.col])) if a.nnz else float("nan")


# ---- the paper's formats --------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    """Planetoid files are pickles, and unpickling can run code: only what those files hold
    (numpy arrays, scipy sparse matrices, a dict of lists) may be rebuilt."""

    NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar"}
    BUILTINS = {"list", "dict", "set", "tuple", "int", "float", "object"}

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if module in ("__builtin__", "copy_reg"):  # Python 2 names
            module = {"__builtin__": "builtins", "copy_reg": "copyreg"}[module]
        allowed = (
            (module.split(".")[0] == "numpy" and name in self.NUMPY)
            or (module.startswith("scipy.sparse") and name.endswith(("_matrix", "_array")))
            or (module == "collections" and name == "defaultdict")
            or (module == "builtins" and name in self.BUILTINS)
            or (module == "copyreg" and name == "_reconstructor")
            or (module == "_codecs" and name == "encode")  # how protocol 2 stores bytes
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path):
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()  # the files were written by Python 2
    except FileNotFoundError:
        raise GraphDataError(f"{path}: missing (Planetoid format: ind.<name>.x, tx, allx, y, ty, ally, graph, "
                             "test.index)") from None
    except Exception as err:
        raise GraphDataError(f"{path}: not a readable Planetoid pickle ({err})") from None


def _dense(value, path: Path) -> np.ndarray:
    try:
        return np.asarray(value.todense() if sp.issparse(value) else value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise GraphDataError(f"{path}: expected a matrix ({err})") from None


def load_planetoid(root: str | Path, name: str) -> AttributedGraph:
    """Cora/CiteSeer/PubMed in the Planetoid layout, assembled as the deep-graph-clustering
    code does: features and one-hot labels of ``allx``/``ally`` then ``tx``/``ty``, with the
    test rows put back at ``test.index``. CiteSeer's isolated test nodes (gaps in the test
    index range) get zero features and class 0, as in that code."""
    root = Path(root)
    # ind.<name>.x / .y (the labelled training rows) are a subset of allx / ally: not needed here
    file = {part: root / f"ind.{name}.{part}" for part in ("tx", "ty", "allx", "ally", "graph")}
    tx, ty = _dense(_unpickle(file["tx"]), file["tx"]), _dense(_unpickle(file["ty"]), file["ty"])
    allx, ally = _dense(_unpickle(file["allx"]), file["allx"]), _dense(_unpickle(file["ally"]), file["ally"])
    graph = _unpickle(file["graph"])
    index_file = root / f"ind.{name}.test.index"
    try:
        test_index = np.array([int(line) for line in index_file.read_text().split()], dtype=np.int64)
    except FileNotFoundError:
        raise GraphDataError(f"{index_file}: missing") from None
    except ValueError as err:
        raise GraphDataError(f"{index_file}: expected one integer per line ({err})") from None
    if len(test_index) != len(tx) or len(ty) != len(tx):
        raise GraphDataError(f"{index_file}: {len(test_index)} test indices for {len(tx)} rows of tx and "
                             f"{len(ty)} of ty")
    if allx.shape[1] != tx.shape[1] or ally.shape[1] != ty.shape[1]:
        raise GraphDataError(f"{file['tx']}: {tx.shape[1]} feature columns, allx has {allx.shape[1]} "
                             f"(labels: {ty.shape[1]} vs {ally.shape[1]})")
    lo = int(test_index.min())
    span = int(test_index.max()) - lo + 1
    if span != len(test_index):  # CiteSeer: isolated test nodes have no row in tx
        full_x, full_y = np.zeros((span, tx.shape[1]), np.float32), np.zeros((span, ty.shape[1]), np.float32)
        full_x[np.sort(test_index) - lo], full_y[np.sort(test_index) - lo] = tx, ty
        tx, ty = full_x, full_y
    features, onehot = np.vstack([allx, tx]), np.vstack([ally, ty])
    order = np.sort(test_index)
    features[test_index], onehot[test_index] = features[order].copy(), onehot[order].copy()
    nodes = len(features)
    if not isinstance(graph, dict):
        raise GraphDataError(f"{file['graph']}: expected a dict of adjacency lists, got {type(graph).__name__}")
    rows, cols = [], []
    for node, neighbours in graph.items():
        rows += [int(node)] * len(neighbours)
        cols += [int(v) for v in neighbours]
    if rows and (max(rows + cols) >= nodes or min(rows + cols) < 0):
        raise GraphDataError(f"{file['graph']}: node ids outside 0..{nodes - 1}")
    adjacency = sp.coo_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(nodes, nodes))
    return AttributedGraph(features, onehot.argmax(1).astype(np.int64), clean_adjacency(adjacency, nodes))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise GraphDataError(f"{path}: missing (format: <name>_feat.npy, <name>_label.npy, <name>_adj.npy)") from None
    except ValueError as err:
        raise GraphDataError(f"{path}: not a plain .npy array ({err})") from None


def load_npy_graph(root: str | Path, name: str) -> AttributedGraph:
    """``<name>_feat.npy`` (N, d), ``<name>_label.npy`` (N,) and ``<name>_adj.npy`` (N, N) in
    ``root`` or ``root/<name>/`` (the layout of the deep-graph-clustering datasets)."""
    root = Path(root)
    if not (root / f"{name}_feat.npy").exists() and (root / name / f"{name}_feat.npy").exists():
        root = root / name
    paths = {part: root / f"{name}_{part}.npy" for part in ("feat", "label", "adj")}
    feat, label, adj = (_load_npy(paths[p]) for p in ("feat", "label", "adj"))
    if feat.ndim != 2:
        raise GraphDataError(f"{paths['feat']}: expected (nodes, features), got shape {feat.shape}")
    nodes = len(feat)
    if label.shape != (nodes,) or not np.issubdtype(label.dtype, np.integer):
        raise GraphDataError(f"{paths['label']}: expected {nodes} integer labels, got {label.dtype} {label.shape}")
    if adj.shape != (nodes, nodes):
        raise GraphDataError(f"{paths['adj']}: expected ({nodes}, {nodes}), got {adj.shape}")
    _, labels = np.unique(label, return_inverse=True)  # labels 0..K-1 whatever the file used
    return AttributedGraph(feat.astype(np.float32), labels.astype(np.int64), clean_adjacency(adj, nodes))


# ---- who holds which nodes ------------------------------------------------------------------


def client_classes(client: int, clusters: int, per_client: int) -> np.ndarray:
    """The classes a client holds under ``disjoint-classes``: ``per_client`` consecutive
    classes starting at ``client * per_client`` (mod K), so clients fall into groups with
    disjoint class sets when ``per_client`` divides K."""
    return (client * per_client + np.arange(per_client)) % clusters


def split_nodes(
    labels: np.ndarray, clients: int, *, scheme: str = "random", classes_per_client: int = 0,
    seed: int | np.random.SeedSequence = 0,
) -> list[np.ndarray]:
    """Each client's node indices (sorted; together every node exactly once).

    ``random``: a seeded permutation cut into near-equal parts. ``disjoint-classes``: each
    node goes to one of the clients holding its class (``client_classes``), at random."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if scheme == "random":
        owner = rng.permutation(np.arange(n) % clients)
    elif scheme == "disjoint-classes":
        clusters = int(labels.max()) + 1
        if not 1 <= classes_per_client <= clusters:
            raise ValueError(f"classes_per_client must lie in 1..{clusters}, got {classes_per_client}")
        holders = [[c for c in range(clients) if k in client_classes(c, clusters, classes_per_client)]
                   for k in range(clusters)]
        orphans = [k for k, h in enumerate(holders) if not h]
        if orphans:
            raise ValueError(f"no client holds class {orphans[0]}: {clients} clients x {classes_per_client} "
                             f"classes cannot cover {clusters} classes")
        owner = np.empty(n, np.int64)
        for k, h in enumerate(holders):
            members = np.flatnonzero(labels == k)
            owner[members] = np.asarray(h)[rng.permutation(np.arange(len(members)) % len(h))]
    else:
        raise ValueError(f"unknown partition {scheme!r}; expected one of {PARTITIONS}")
    parts = [np.flatnonzero(owner == c) for c in range(clients)]
    empty = [c for c, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"client {empty[0]} holds no node")
    return parts


def client_subgraph(graph: AttributedGraph, nodes: np.ndarray) -> AttributedGraph:
    """The subgraph a client holds: its nodes and the edges between them only."""
    return AttributedGraph(graph.features[nodes], graph.labels[nodes], graph.adjacency[nodes][:, nodes].tocsr())
