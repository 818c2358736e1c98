"""Clustered aggregation, pure numpy: k models, each client in the cluster it picked.

The server-side half of Su, Xu, Yang (NeurIPS 2022) Phase 2 and of IFCA (Ghosh et al. 2020):
clients pick the model with the smallest local loss (``client.compute.assign_clusters``) and
send the refined model; the server averages per cluster, weighted by examples, and an empty cluster
keeps its previous model.

Besides the mean: IFCA's official divisor (``official_means``), a server step with momentum
on each cluster's averaged update (``server_step``), and the second-order refinement
(``cluster_least_squares``), where clients send normal equations instead of models.

Aggregation is decomposable: ``proto.wire.cluster_sums`` turns any set of clients into
per-cluster sums (double-double, see ``proto.exact_sum``), and ``combine_sums`` adds such sums. A cohort can thus
send either every client's result or its partial sums, and the new models are the same.
"""

from __future__ import annotations

import numpy as np

from proto.exact_sum import dd_value
from proto.wire import (
    CLUSTER, LOSS_BEFORE, NORMAL_CONSTANT, NORMAL_MATRIX, NORMAL_VECTOR, ClientBatch, ClusterSums, Params, cluster_sums,
    combine_sums,
)
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


def official_means(sums: ClusterSums, previous: Params) -> Params:
    """IFCA's official update: each cluster moves by its clients' summed update divided by
    all of the round's examples, not the cluster's (with one step and equal local sizes,
    theta_j - lr/m * sum over its machines of their gradients, as in the authors' code)."""
    total = max(int(sums.examples.sum()), 1)
    new = {}
    for name, prev in previous.items():
        shape = (-1, *([1] * (prev.ndim - 1)))
        moved = dd_value(sums.weighted[name]) - sums.examples.reshape(shape) * prev
        new[name] = prev + moved / total
    return new


def cluster_least_squares(sums: ClusterSums, previous: Params, ridge: float) -> Params:
    """Second-order refinement: each cluster's least squares from its clients' summed normal
    equations (``NORMAL_MATRIX``, ``NORMAL_VECTOR``: example-weighted sums of X'X/n and X'y/n),
    with a ridge towards the cluster's previous model of ``ridge`` times the mean curvature
    (tr A / P): (A + r I) w = b + r w_prev. An empty cluster keeps its model."""
    rows = flat_models(previous)
    matrix, vector = dd_value(sums.weighted[NORMAL_MATRIX]), dd_value(sums.weighted[NORMAL_VECTOR])
    for j in np.flatnonzero(sums.examples > 0):
        a, b = matrix[j] / sums.examples[j], vector[j] / sums.examples[j]
        r = ridge * max(float(np.trace(a)) / len(a), np.finfo(float).tiny)
        rows[j] = np.linalg.solve(a + r * np.eye(len(a)), b + r * rows[j])
    return unflatten(rows, previous)


Mixture = tuple[float, np.ndarray]  # soft assignments' state: noise variance, cluster weights


def soft_least_squares(batch: ClientBatch, previous: Params, ridge: float,
                       mixture: Mixture | None) -> tuple[Params, Mixture]:
    """Second-order refinement with soft assignments: one EM step for the mixture of k
    linear regressions, from each client's normal equations (per example: A_i, b_i, c_i).

    A client's squared error under model j, n_i (w_j'A_i w_j - 2 b_i'w_j + c_i), gives its
    responsibilities r_ij ~ pi_j exp(-error_ij / 2 s^2) (all of a client's points share one
    cluster); each cluster solves its least squares weighted by r_ij n_i, with the ridge of
    ``cluster_least_squares``; then the noise variance s^2 and the weights pi are re-estimated.
    A hard choice counts a one-point client near two models wholly in one of them, which
    biases both; its responsibilities split it. ``mixture``: (s^2, pi) of the round before;
    None: s^2 from each client's best model, pi uniform. ``batch``: every client of the
    round, in client-id order (``merge_batches``), so the result does not depend on cohorts."""
    rows = flat_models(previous)
    n = batch.num_examples.astype(np.float64)
    a, b, c = (np.asarray(batch.params[name], np.float64) for name in (NORMAL_MATRIX, NORMAL_VECTOR, NORMAL_CONSTANT))
    tiny = np.finfo(float).tiny

    def squared_errors(w: np.ndarray) -> np.ndarray:  # (clients, k)
        quadratic = np.einsum("ikp,kp->ik", np.einsum("ipq,kq->ikp", a, w), w)
        return np.maximum(n[:, None] * (quadratic - 2 * b @ w.T + c[:, None]), 0.0)

    errors = squared_errors(rows)
    if mixture is None:
        mixture = (float(errors.min(axis=1).sum() / n.sum()), np.full(len(rows), 1 / len(rows)))
    variance, weights = mixture
    log_post = np.log(np.maximum(weights, tiny)) - errors / (2 * max(variance, tiny))
    resp = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    resp /= resp.sum(axis=1, keepdims=True)
    new = rows.copy()
    for j in range(len(rows)):
        mass = resp[:, j] * n
        if not mass.sum() > 0:
            continue  # no client's weight: the model stays
        aj, bj = np.einsum("i,ipq->pq", mass, a) / mass.sum(), mass @ b / mass.sum()
        r = ridge * max(float(np.trace(aj)) / len(aj), tiny)
        new[j] = np.linalg.solve(aj + r * np.eye(len(aj)), bj + r * rows[j])
    variance = float((resp * squared_errors(new)).sum() / n.sum())
    return unflatten(new, previous), (variance, resp.mean(axis=0))


def server_step(previous: Params, averaged: Params, velocity: Params | None, lr: float, momentum: float,
                empty: np.ndarray) -> tuple[Params, Params]:
    """Each cluster's server step on its averaged update (heavy ball): v = momentum v +
    (averaged - previous), new = previous + lr v. An empty cluster keeps its model and
    forgets its velocity. Returns (new models, velocities)."""
    new, velocities = {}, {}
    for name, prev in previous.items():
        keep = empty.reshape(-1, *([1] * (prev.ndim - 1)))
        v = (averaged[name] - prev) + (momentum * velocity[name] if velocity is not None else 0.0)
        velocities[name] = np.where(keep, 0.0, v)
        new[name] = prev + lr * velocities[name]
    return new, velocities


def flat_models(models: Params) -> np.ndarray:
    """(k, P): each of the k stacked models as one float64 row, in the parameters' order."""
    k = len(next(iter(models.values())))
    return np.concatenate([np.asarray(v, np.float64).reshape(k, -1) for v in models.values()], axis=1)


def unflatten(rows: np.ndarray, reference: Params) -> Params:
    """(k, P) flattened models -> named arrays stacked on the model axis, as ``reference``."""
    out, offset = {}, 0
    for name, ref in reference.items():
        shape = ref.shape[1:]
        size = int(np.prod(shape))
        out[name] = rows[:, offset:offset + size].reshape(len(rows), *shape)
        offset += size
    return out


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
