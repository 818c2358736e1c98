"""Pure numpy aggregation over batches of client results (``proto.wire.ClientBatch``).

A ``ClientBatch`` is what a cohort sends back: per-client parameters stacked along a leading
client axis, example counts, and per-client metric sums. Batches from all cohorts are merged
and sorted by client id before anything is summed, so the result does not depend on how
clients were grouped into cohorts nor on the order replies arrived in.
"""

from __future__ import annotations

import numpy as np

from proto.wire import ClientBatch, MalformedBatch


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
