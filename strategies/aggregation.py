"""Pure numpy aggregation over batches of client results (no Flower here).

A ``ClientBatch`` is what a cohort sends back: per-client parameters stacked along a leading
client axis, example counts, and per-client metric sums. Batches from all cohorts are merged
and sorted by client id before anything is summed, so the result does not depend on how
clients were grouped into cohorts nor on the order replies arrived in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]


class MalformedBatch(ValueError):
    """A client batch that cannot be aggregated; the message says why."""


@dataclass
class ClientBatch:
    client_ids: np.ndarray  # (B,) int64
    num_examples: np.ndarray  # (B,) int64
    params: Params  # name -> (B, *shape); may be empty (evaluation replies)
    metrics: dict[str, np.ndarray]  # name -> (B,) per-client sums over local examples

    def __len__(self) -> int:
        return len(self.client_ids)


def validate_batch(batch: ClientBatch, reference: Params | None) -> None:
    """Raise ``MalformedBatch`` naming the first problem found.

    ``reference`` gives the expected parameter names and shapes (None: no parameters).
    """
    ids, counts = batch.client_ids, batch.num_examples
    if ids.ndim != 1 or counts.shape != ids.shape:
        raise MalformedBatch(
            f"client-id shape {ids.shape} and num-examples shape {counts.shape} differ"
        )
    if len(ids) == 0:
        raise MalformedBatch("empty batch")
    if not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(counts.dtype, np.integer):
        raise MalformedBatch("client-id and num-examples must be integers")
    if len(np.unique(ids)) != len(ids):
        raise MalformedBatch("duplicate client ids")
    if (counts <= 0).any():
        raise MalformedBatch(f"non-positive num-examples ({int(counts.min())})")
    if reference is not None:
        if set(batch.params) != set(reference):
            raise MalformedBatch(
                f"parameter names {sorted(batch.params)} differ from {sorted(reference)}"
            )
        for name, ref in reference.items():
            expected = (len(ids), *ref.shape)
            if batch.params[name].shape != expected:
                raise MalformedBatch(
                    f"parameter {name!r} has shape {batch.params[name].shape}, "
                    f"expected {expected}"
                )
            if not np.isfinite(batch.params[name]).all():
                raise MalformedBatch(f"parameter {name!r} has non-finite values")
    for name, values in batch.metrics.items():
        if values.shape != ids.shape:
            raise MalformedBatch(f"metric {name!r} has shape {values.shape}, expected {ids.shape}")
        if not np.isfinite(values).all():
            raise MalformedBatch(f"metric {name!r} has non-finite values")


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
