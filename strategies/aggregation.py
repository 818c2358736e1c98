"""Pure numpy aggregation over batches of client results (``proto.wire.ClientBatch``).

A ``ClientBatch`` is what a cohort sends back: per-client parameters stacked along a leading
client axis, example counts, and per-client metric sums. Batches from all cohorts are merged
and sorted by client id before anything is summed, so the result does not depend on how
clients were grouped into cohorts nor on the order replies arrived in.
"""

from __future__ import annotations

import numpy as np

from proto.wire import ClientBatch, MalformedBatch, Params


def merge_batches(batches: list[ClientBatch]) -> ClientBatch | None:
    """Concatenate batches and sort by client id; None when there is nothing to merge.

    A client id present in two batches is a protocol error (two nodes claimed one client).
    """
    if not batches:
        return None
    ids = np.concatenate([b.client_ids for b in batches]).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        raise MalformedBatch("a client id was reported by two nodes")
    counts = np.concatenate([b.num_examples for b in batches]).astype(np.int64)[order]
    params = {
        name: np.concatenate([b.params[name] for b in batches])[order]
        for name in batches[0].params
    }
    metrics = {
        name: np.concatenate([b.metrics[name] for b in batches])[order]
        for name in batches[0].metrics
    }
    return ClientBatch(ids, counts, params, metrics)


def drop_shared_clients(batches: list[ClientBatch], nodes: list[int]) -> tuple[list[ClientBatch], list[str]]:
    """A client id reported twice (by two nodes, or twice by one; ``nodes[i]`` sent
    ``batches[i]``) is a protocol error, and no report of it can be trusted: that client is
    dropped from every batch, the rest of each batch is kept. Returns the batches and one
    reason per shared id, naming it and its nodes."""
    if not batches:
        return batches, []
    ids = np.concatenate([b.client_ids for b in batches]).astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    shared = unique[counts > 1]
    if not len(shared):
        return batches, []
    senders = np.concatenate([np.full(len(b.client_ids), node, np.int64) for b, node in zip(batches, nodes)])
    reasons = []
    for client in shared.tolist():
        by = senders[ids == client].tolist()
        reasons.append(f"client {client} was reported {len(by)} times, by node"
                       f"{'s' if len(set(by)) > 1 else ''} {', '.join(map(str, sorted(set(by))))}: "
                       "dropped from every reply")
    kept = []
    for b in batches:
        keep = ~np.isin(b.client_ids, shared)
        if keep.all():
            kept.append(b)
        elif keep.any():
            kept.append(ClientBatch(b.client_ids[keep], b.num_examples[keep],
                                    {n: v[keep] for n, v in b.params.items()},
                                    {n: v[keep] for n, v in b.metrics.items()}))
    return kept, reasons


def weighted_average(batch: ClientBatch) -> Params:
    """FedAvg: the example-weighted mean of the clients' parameters."""
    weights = batch.num_examples.astype(np.float64)
    total = weights.sum()
    return {
        name: np.tensordot(weights, values, axes=1) / total for name, values in batch.params.items()
    }


def metric_means(batch: ClientBatch) -> dict[str, float]:
    """Per-example means of the clients' metric sums."""
    total = float(batch.num_examples.sum())
    return {name: float(values.sum() / total) for name, values in batch.metrics.items()}


# ---- per-cluster aggregation rules: (n, P) flattened client models and their example
# counts -> one (P,) model. ``mean`` is the default (exact double-double sums elsewhere).

def coordinate_median(models: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The coordinate-wise median of the example-weighted distribution (each client counts
    by its examples, as in the mean; Yin et al. 2018 with weights): robust while attackers
    hold under half of the examples."""
    values, w, upper = _sorted_weights(models, weights)
    idx = (upper < w.sum(axis=0) / 2).sum(axis=0)  # where the cumulative weight crosses half
    return np.take_along_axis(values, idx[None], axis=0)[0]


def trimmed_mean(models: np.ndarray, weights: np.ndarray, beta: float = 0.2) -> np.ndarray:
    """The coordinate-wise example-weighted mean of the values between the ``beta`` and
    ``1 - beta`` quantiles of the example mass (Yin et al. 2018 with weights; beta = 0: the
    mean)."""
    values, w, upper = _sorted_weights(models, weights)
    total = w.sum(axis=0)
    lo, hi = beta * total, (1 - beta) * total
    kept = np.clip(np.minimum(upper, hi) - np.maximum(upper - w, lo), 0.0, None)  # weight inside [lo, hi]
    return (kept * values).sum(axis=0) / kept.sum(axis=0)


def _sorted_weights(models: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per coordinate: the values sorted, their clients' weights, and the cumulative weight."""
    order = np.argsort(models, axis=0, kind="stable")
    w = np.asarray(weights, np.float64)[order]
    return np.take_along_axis(models, order, axis=0), w, np.cumsum(w, axis=0)


def krum(models: np.ndarray, weights: np.ndarray, malicious: int = 1) -> np.ndarray:
    """Krum (Blanchard et al. 2017): the model whose ``n - f - 2`` nearest neighbours are
    closest (at least one neighbour)."""
    n = len(models)
    if n == 1:
        return models[0]
    sq = (models ** 2).sum(axis=1)
    distances = np.maximum(sq[:, None] + sq[None, :] - 2 * models @ models.T, 0.0)
    np.fill_diagonal(distances, np.inf)
    nearest = max(1, min(n - 1, n - malicious - 2))
    scores = np.sort(distances, axis=1)[:, :nearest].sum(axis=1)
    return models[int(np.argmin(scores))]
