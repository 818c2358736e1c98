"""The models: a feature-only MLP, GCN and GAT on the relations merged, RGCN with one weight
per relation, and a relation-attention model (RGT-like), each with a bot head (2 classes)
and a stance head (3 classes) on one shared body.

All share MGTAB's skeleton: Linear + LeakyReLU on the input, two graph layers (dropout
between), the heads. The graph is handed in as ``Graph``: per-relation row-normalised
adjacencies (mean over a relation's neighbours) and the merged, symmetrically normalised
adjacency with self-loops (GCN's), built once per subgraph as torch sparse matrices.

- GCN: h' = Â h W, a sparse product (PyTorch Geometric's ``GCNConv`` gives the same layer
  and is slower here; README, ``benchmarks/mgtab.py --speed``).
- GAT: PyTorch Geometric's ``GATConv`` (4 heads, then 1), on the merged edges.
- RGCN: h' = LayerNorm(h W_0 + Σ_r A_r h W_r) with full per-relation weights (basis
  decomposition with two bases cannot hold homophilous and heterophilous relations at once:
  the spec's measurement); the R products in one sparse product over [A_1 ... A_R].
- Relation attention (RGT-like): per-relation messages m_r = A_r h W_r, then semantic
  attention across relations per user, α_r = softmax_r(q · tanh(W_a m_r + b)), and
  h' = LayerNorm(h W_0 + Σ_r α_r m_r): it learns which relations to trust for each user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "gcn", "gat", "rgcn", "rgt")
DROPOUT = 0.3


@dataclass(frozen=True)
class Graph:
    """One subgraph's adjacencies for the models (built by ``build_graph``)."""

    relations: list[torch.Tensor]  # R sparse (n, n), row-normalised (mean aggregation)
    stacked: torch.Tensor  # sparse (n, R n): [A_1 ... A_R]
    merged: torch.Tensor  # sparse (n, n): D^-1/2 (A + I) D^-1/2 over the union of the relations
    edge_index: torch.Tensor  # (2, e) long: the merged edges, both directions, with self-loops (GAT)


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    index = torch.as_tensor(np.stack([rows, cols]), dtype=torch.long)
    values_ = torch.as_tensor(values, dtype=torch.float32)
    return torch.sparse_coo_tensor(index, values_, shape, check_invariants=False).coalesce()  # built valid here


def build_graph(n: int, edges: np.ndarray, edge_type: np.ndarray, relations: list[int]) -> Graph:
    """The adjacencies of a subgraph of ``n`` users from its undirected ``edges`` (2, m)
    (local indices) of types ``edge_type``, keeping the relation types ``relations``."""
    per_relation = []
    rows_all, cols_all = [], []
    for r in relations:
        e = edges[:, edge_type == r]
        rows = np.concatenate([e[0], e[1]])
        cols = np.concatenate([e[1], e[0]])
        key = np.unique(rows * n + cols)
        rows, cols = key // n, key % n
        degree = np.bincount(rows, minlength=n).astype(np.float64)
        per_relation.append((rows, cols, 1.0 / degree[rows]))
        rows_all.append(rows)
        cols_all.append(cols)
    relation_mats = [_sparse(r, c, v, (n, n)) for r, c, v in per_relation]
    stacked = _sparse(np.concatenate([r for r, _, _ in per_relation]) if per_relation else np.empty(0, np.int64),
                      np.concatenate([c + i * n for i, (_, c, _) in enumerate(per_relation)])
                      if per_relation else np.empty(0, np.int64),
                      np.concatenate([v for _, _, v in per_relation]) if per_relation else np.empty(0),
                      (n, max(len(relations), 1) * n))
    loops = np.arange(n)
    key = np.unique(np.concatenate([np.concatenate(rows_all) * n + np.concatenate(cols_all) if rows_all
                                    else np.empty(0, np.int64), loops * n + loops]))
    rows, cols = key // n, key % n
    degree = np.bincount(rows, minlength=n).astype(np.float64)
    norm = 1.0 / np.sqrt(degree[rows] * degree[cols])
    return Graph(relations=relation_mats, stacked=stacked, merged=_sparse(rows, cols, norm, (n, n)),
                 edge_index=torch.as_tensor(np.stack([cols, rows]), dtype=torch.long))


class Heads(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.bot = nn.Linear(hidden, 2)
        self.stance = nn.Linear(hidden, 3)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bot(h), self.stance(h)


class MLP(nn.Module):
    """Features only: the graph is ignored."""

    def __init__(self, d: int, hidden: int, relations: int) -> None:
        super().__init__()
        self.inp, self.l1, self.l2 = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.heads = Heads(hidden)

    def forward(self, x: torch.Tensor, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.inp(x))
        h = F.dropout(F.relu(self.l1(h)), DROPOUT, self.training)
        return self.heads(F.relu(self.l2(h)))


class GCN(nn.Module):
    def __init__(self, d: int, hidden: int, relations: int) -> None:
        super().__init__()
        self.inp, self.l1, self.l2 = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.heads = Heads(hidden)

    def forward(self, x: torch.Tensor, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.inp(x))
        h = F.dropout(F.relu(torch.sparse.mm(graph.merged, self.l1(h))), DROPOUT, self.training)
        return self.heads(F.relu(torch.sparse.mm(graph.merged, self.l2(h))))


class GAT(nn.Module):
    def __init__(self, d: int, hidden: int, relations: int, heads: int = 4) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv

        self.inp = nn.Linear(d, hidden)
        self.l1 = GATConv(hidden, hidden // heads, heads=heads, add_self_loops=False)
        self.l2 = GATConv(hidden, hidden, heads=1, add_self_loops=False)
        self.heads = Heads(hidden)

    def forward(self, x: torch.Tensor, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.inp(x))
        h = F.dropout(F.elu(self.l1(h, graph.edge_index)), DROPOUT, self.training)
        return self.heads(F.elu(self.l2(h, graph.edge_index)))


class RGCNLayer(nn.Module):
    """h' = LayerNorm(h W_0 + Σ_r A_r h W_r): a self weight and one full weight per relation."""

    def __init__(self, hidden: int, relations: int) -> None:
        super().__init__()
        self.relations = relations
        self.self_weight = nn.Linear(hidden, hidden)
        self.relation_weight = nn.Parameter(torch.empty(relations, hidden, hidden))
        nn.init.xavier_uniform_(self.relation_weight.view(relations * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)

    def messages(self, h: torch.Tensor) -> torch.Tensor:
        """(R n, hidden): h W_r for every relation, stacked relation after relation."""
        return torch.einsum("nd,rde->rne", h, self.relation_weight).reshape(-1, h.shape[1])

    def forward(self, h: torch.Tensor, graph: Graph) -> torch.Tensor:
        return self.norm(self.self_weight(h) + torch.sparse.mm(graph.stacked, self.messages(h)))


class RGCN(nn.Module):
    def __init__(self, d: int, hidden: int, relations: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.l1, self.l2 = RGCNLayer(hidden, relations), RGCNLayer(hidden, relations)
        self.heads = Heads(hidden)

    def forward(self, x: torch.Tensor, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.inp(x))
        h = F.dropout(F.leaky_relu(self.l1(h, graph)), DROPOUT, self.training)
        return self.heads(F.leaky_relu(self.l2(h, graph)))


class RelationAttentionLayer(RGCNLayer):
    """Per-relation messages weighted per user by semantic attention across relations."""

    def __init__(self, hidden: int, relations: int, attention: int = 16) -> None:
        super().__init__(hidden, relations)
        self.attend = nn.Linear(hidden, attention)
        self.query = nn.Parameter(torch.randn(attention) / attention ** 0.5)

    def forward(self, h: torch.Tensor, graph: Graph) -> torch.Tensor:
        n = h.shape[0]
        m = self.messages(h).view(self.relations, n, -1)
        m = torch.stack([torch.sparse.mm(a, m[r]) for r, a in enumerate(graph.relations)])  # (R, n, hidden)
        alpha = torch.softmax(torch.tanh(self.attend(m)) @ self.query, dim=0)  # (R, n)
        return self.norm(self.self_weight(h) + (alpha[..., None] * m).sum(0))


class RGT(RGCN):
    def __init__(self, d: int, hidden: int, relations: int) -> None:
        super().__init__(d, hidden, relations)
        self.l1, self.l2 = RelationAttentionLayer(hidden, relations), RelationAttentionLayer(hidden, relations)


CLASSES = {"mlp": MLP, "gcn": GCN, "gat": GAT, "rgcn": RGCN, "rgt": RGT}


def build_model(name: str, d: int, hidden: int, relations: int) -> nn.Module:
    if name not in CLASSES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return CLASSES[name](d, hidden, relations)


def joint_loss(bot_logits: torch.Tensor, stance_logits: torch.Tensor, y_bot: torch.Tensor,
               y_stance: torch.Tensor, stance_weight: float) -> torch.Tensor:
    """Cross-entropy of the bot head plus ``stance_weight`` x that of the stance head."""
    return F.cross_entropy(bot_logits, y_bot) + stance_weight * F.cross_entropy(stance_logits, y_stance)
