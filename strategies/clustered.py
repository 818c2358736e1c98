"""Clustered aggregation, pure numpy: k models, each client in the cluster it picked.

The server-side half of Su, Xu, Yang (NeurIPS 2022) Phase 2 and of IFCA (Ghosh et al. 2020):
clients pick the model with the smallest local loss (ties to the lowest index) and send the
refined model; the server averages per cluster, weighted by examples, and an empty cluster
keeps its previous model.

Aggregation is decomposable: ``cluster_sums`` turns any set of clients into per-cluster
sums (double-double, see ``exact_sum``), and ``combine`` adds such sums. A cohort can thus
send either every client's result or its partial sums, and the new models are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies.aggregation import ClientBatch, MalformedBatch, Params, merge_batches
from strategies.exact_sum import DD, dd_add, dd_sum, dd_value


def assign_clusters(losses: np.ndarray) -> np.ndarray:
    """(B, k) local losses -> the chosen cluster of each client (ties: lowest index)."""
    return np.argmin(losses, axis=1)


@dataclass
class ClusterSums:
    """Per-cluster sums over a set of clients (k clusters)."""

    weighted: dict[str, DD]  # name -> (hi, lo), each (k, *shape): sum of n_i * w_i
    examples: np.ndarray  # (k,) int64: sum of n_i
    clients: np.ndarray  # (k,) int64
    loss: DD  # (k,): sum of n_i * (mean loss of i under its chosen model before training)

    @property
    def k(self) -> int:
        return len(self.examples)


def cluster_sums(
    choice: np.ndarray,
    num_examples: np.ndarray,
    params: Params,
    loss_sums: np.ndarray,
    k: int,
) -> ClusterSums:
    """Sums of one set of clients. Clients must be in a canonical order only for speed:
    the double-double sums do not depend on it."""
    weights = num_examples.astype(np.float64)
    weighted, examples, clients, loss = {}, np.zeros(k, np.int64), np.zeros(k, np.int64), []
    for name, values in params.items():
        terms = values * weights.reshape(-1, *([1] * (values.ndim - 1)))
        parts = [dd_sum(terms[choice == j]) for j in range(k)]
        weighted[name] = (np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]))
    for j in range(k):
        members = choice == j
        examples[j] = num_examples[members].sum()
        clients[j] = members.sum()
        loss.append(dd_sum(loss_sums[members]))
    loss_dd = (np.array([p[0] for p in loss]), np.array([p[1] for p in loss]))
    return ClusterSums(weighted, examples, clients, loss_dd)


def combine(parts: list[ClusterSums]) -> ClusterSums | None:
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = ClusterSums(
            {name: dd_add(total.weighted[name], part.weighted[name]) for name in total.weighted},
            total.examples + part.examples,
            total.clients + part.clients,
            dd_add(total.loss, part.loss),
        )
    return total


def aggregate_results(
    batches: list[ClientBatch], partial: list[ClusterSums], k: int
) -> ClusterSums | None:
    """Per-cluster sums over every client of every reply, whichever form the reply took.

    Per-client batches are merged (a client claimed twice raises ``MalformedBatch``) and
    summed per chosen cluster; partial sums are added as they are.
    """
    merged = merge_batches(batches)
    parts = list(partial)
    if merged is not None:
        choice = merged.metrics["cluster"].astype(np.int64)
        parts.append(cluster_sums(choice, merged.num_examples, merged.params,
                                  merged.metrics["loss-before"], k))
    return combine(parts)


def cluster_means(sums: ClusterSums, previous: Params) -> Params:
    """New models: example-weighted means per cluster; an empty cluster keeps its model."""
    new = {}
    for name, prev in previous.items():
        mean = dd_value(sums.weighted[name]) / np.maximum(sums.examples, 1).reshape(
            -1, *([1] * (prev.ndim - 1))
        )
        empty = (sums.examples == 0).reshape(-1, *([1] * (prev.ndim - 1)))
        new[name] = np.where(empty, prev, mean)
    return new


def validate_sums(sums: ClusterSums, reference: Params) -> None:
    """Raise ``MalformedBatch`` naming what is wrong with a cohort's partial sums."""
    k = len(next(iter(reference.values())))
    if sums.examples.shape != (k,) or sums.clients.shape != (k,):
        raise MalformedBatch(f"cluster counts have shape {sums.examples.shape}, expected ({k},)")
    if not np.issubdtype(sums.examples.dtype, np.integer):
        raise MalformedBatch("cluster counts must be integers")
    if (sums.examples < 0).any() or (sums.clients < 0).any():
        raise MalformedBatch("negative cluster counts")
    if (sums.clients > sums.examples).any():
        raise MalformedBatch("more clients than examples in a cluster")
    if set(sums.weighted) != set(reference):
        raise MalformedBatch(f"sum names {sorted(sums.weighted)} differ from {sorted(reference)}")
    for name, ref in reference.items():
        for part in sums.weighted[name]:
            if part.shape != ref.shape:
                raise MalformedBatch(f"sum {name!r} has shape {part.shape}, expected {ref.shape}")
            if not np.isfinite(part).all():
                raise MalformedBatch(f"sum {name!r} has non-finite values")
    for part in sums.loss:
        if part.shape != (k,) or not np.isfinite(part).all():
            raise MalformedBatch("loss sums malformed or non-finite")


# ---- k-means++ with restarts (used on anchor estimates in Phase 1) -------------------------


def kmeans(points: np.ndarray, k: int, restarts: int, seed: int, iters: int = 100) -> np.ndarray:
    """k-means++ seeding then Lloyd, best of ``restarts`` by within-cluster sum of squares.

    Deterministic in ``seed``. An empty cluster during Lloyd keeps its centre.
    """
    if len(points) < k:
        raise ValueError(f"{len(points)} points cannot give {k} k-means centres")
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = [points[rng.integers(len(points))]]
        for _ in range(1, k):
            d2 = np.min(((points[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            if d2.sum() == 0:  # fewer distinct points than k: duplicate a centre
                centres.append(points[rng.integers(len(points))])
                continue
            centres.append(points[rng.choice(len(points), p=d2 / d2.sum())])
        c = np.array(centres)
        for _ in range(iters):
            label = np.argmin(((points[:, None] - c[None]) ** 2).sum(-1), axis=1)
            new = np.array(
                [points[label == j].mean(0) if (label == j).any() else c[j] for j in range(k)]
            )
            if np.allclose(new, c):
                break
            c = new
        cost = ((points - c[label]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = c, cost
    return best
