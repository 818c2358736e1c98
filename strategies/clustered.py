"""Clustered aggregation, pure numpy: k models, each client in the cluster it picked.

The server-side half of Su, Xu, Yang (NeurIPS 2022) Phase 2 and of IFCA (Ghosh et al. 2020):
clients pick the model with the smallest local loss (``client.compute.assign_clusters``) and
send the refined model; the server averages per cluster, weighted by examples, and an empty cluster
keeps its previous model.

Aggregation is decomposable: ``proto.wire.cluster_sums`` turns any set of clients into
per-cluster sums (double-double, see ``proto.exact_sum``), and ``combine_sums`` adds such sums. A cohort can thus
send either every client's result or its partial sums, and the new models are the same.
"""

from __future__ import annotations

import numpy as np

from proto.exact_sum import dd_value
from proto.wire import CLUSTER, LOSS_BEFORE, ClientBatch, ClusterSums, Params, cluster_sums, combine_sums
from strategies.aggregation import merge_batches


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
        choice = merged.metrics[CLUSTER].astype(np.int64)
        parts.append(cluster_sums(choice, merged.num_examples, merged.params,
                                  merged.metrics[LOSS_BEFORE], k))
    return combine_sums(parts)


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
