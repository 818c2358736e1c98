"""How a cohort's results travel in a Flower reply, and how the server reads them back.

A reply's ``RecordDict`` holds
- ``"arrays"`` (train replies only): each parameter stacked over the cohort's clients, (B, ...);
- ``"clients"``: an ``ArrayRecord`` with ``client-id`` and ``num-examples`` (B,) and one
  ``metric.<name>`` array of per-client sums per metric;
- ``"metrics"``: a ``MetricRecord`` with the cohort's total ``num-examples`` and ``clients``
  (what Flower's own tooling expects to find).

k-model (clustered) train replies carry either the above (with each client's chosen cluster
as the per-client metric ``cluster``) or, instead of ``"arrays"``/``"clients"``, a ``"sums"``
record of per-cluster double-double partial sums; both may add ``"stats"`` with the
``confusion`` counts (chosen x true cluster x size bucket) when clients know their labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from strategies.aggregation import ClientBatch, MalformedBatch, Params, validate_batch
from strategies.clustered import ClusterSums, validate_sums


@dataclass
class CohortResult:
    """A cohort's answer to a k-model train request: per-client results or partial sums."""

    batch: ClientBatch | None  # per client: params, counts, chosen cluster, loss-before
    sums: ClusterSums | None
    confusion: np.ndarray | None  # (k, k_true, buckets) client counts, when labels are known
    outcomes: np.ndarray | None = None  # clients left out, by reason (federation.OUTCOMES)

METRIC_PREFIX = "metric."


def params_to_record(params: Params) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in params.items()})


def record_to_params(record: ArrayRecord) -> Params:
    return {name: array.numpy() for name, array in record.items()}


def encode_batch(batch: ClientBatch) -> RecordDict:
    clients = {
        "client-id": batch.client_ids.astype(np.int64),
        "num-examples": batch.num_examples.astype(np.int64),
    }
    clients.update({METRIC_PREFIX + k: v.astype(np.float64) for k, v in batch.metrics.items()})
    content = RecordDict(
        {
            "clients": params_to_record(clients),
            "metrics": MetricRecord(
                {"num-examples": int(batch.num_examples.sum()), "clients": len(batch)}
            ),
        }
    )
    if batch.params:
        content["arrays"] = params_to_record(batch.params)
    return content


def decode_batch(content: RecordDict, reference: Params | None) -> ClientBatch:
    """Read and validate a cohort reply; raise ``MalformedBatch`` naming what is wrong."""
    try:
        clients = record_to_params(content["clients"])
        ids, counts = clients.pop("client-id"), clients.pop("num-examples")
        params = record_to_params(content["arrays"]) if reference is not None else {}
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedBatch(f"missing or unreadable record: {err}") from None
    metrics = {
        k.removeprefix(METRIC_PREFIX): v for k, v in clients.items() if k.startswith(METRIC_PREFIX)
    }
    batch = ClientBatch(ids, counts, params, metrics)
    validate_batch(batch, reference)
    return batch


# ---- k-model (clustered) replies: per-client results or per-cluster partial sums -----------


def encode_sums(sums: ClusterSums) -> ArrayRecord:
    arrays = {"examples": sums.examples, "clients": sums.clients,
              "loss.hi": sums.loss[0], "loss.lo": sums.loss[1]}
    for name, (hi, lo) in sums.weighted.items():
        arrays[f"{name}.hi"], arrays[f"{name}.lo"] = hi, lo
    return params_to_record(arrays)


def decode_sums(record: ArrayRecord, reference: Params) -> ClusterSums:
    try:
        a = record_to_params(record)
        sums = ClusterSums(
            {name: (a[f"{name}.hi"], a[f"{name}.lo"]) for name in reference},
            a["examples"], a["clients"], (a["loss.hi"], a["loss.lo"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedBatch(f"missing or unreadable partial sums: {err}") from None
    validate_sums(sums, reference)
    return sums


def is_empty_reply(content: RecordDict) -> bool:
    """A cohort none of whose clients took part: valid, it just carries nothing to add."""
    if any(key in content for key in ("clients", "sums", "arrays")) or "metrics" not in content:
        return False
    return content["metrics"].get("clients") == 0


def encode_result(result: CohortResult) -> RecordDict:
    """A cohort's train reply; an empty one (no client took part) carries only counts."""
    content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "clients": 0})})
    if result.batch is not None:
        content = encode_batch(result.batch)
    elif result.sums is not None:
        content["sums"] = encode_sums(result.sums)
    stats = {}
    if result.confusion is not None:
        stats["confusion"] = result.confusion
    if result.outcomes is not None:
        stats["outcomes"] = result.outcomes
    if stats:
        content["stats"] = params_to_record(stats)
    return content


def decode_outcomes(content: RecordDict) -> np.ndarray | None:
    """A cohort's counts of clients left out of the round, by reason (telemetry)."""
    if "stats" not in content or "outcomes" not in content["stats"]:
        return None
    outcomes = record_to_params(content["stats"])["outcomes"]
    if outcomes.ndim != 1 or not np.issubdtype(outcomes.dtype, np.integer) or (outcomes < 0).any():
        raise MalformedBatch(f"unreadable outcome counts {outcomes!r}")
    return outcomes


def decode_confusion(content: RecordDict, shape: tuple[int, ...] | None) -> np.ndarray | None:
    if "stats" not in content:
        return None
    try:
        confusion = record_to_params(content["stats"])["confusion"]
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedBatch(f"unreadable confusion counts: {err}") from None
    if shape is not None and confusion.shape != shape:
        raise MalformedBatch(f"confusion has shape {confusion.shape}, expected {shape}")
    if not np.issubdtype(confusion.dtype, np.integer) or (confusion < 0).any():
        raise MalformedBatch("confusion counts must be non-negative integers")
    return confusion


def decode_clustered_batch(content: RecordDict, models: Params) -> ClientBatch:
    """Per-client results of a k-model round: shapes of one model, a valid chosen cluster."""
    k = len(next(iter(models.values())))
    one_model = {name: v[0] for name, v in models.items()}
    batch = decode_batch(content, one_model)
    cluster = batch.metrics.get("cluster")
    if cluster is None or ((cluster != np.round(cluster)) | (cluster < 0) | (cluster >= k)).any():
        raise MalformedBatch(f"chosen clusters missing or outside [0, {k})")
    return batch
