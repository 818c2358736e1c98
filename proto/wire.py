"""The wire format: what a cohort sends the server, and the names both sides agree on.

The client, the server and the strategies all import this module (and nothing of each
other's) for:

- the names of Phase-1 steps and of the statistics they return (``SECOND_MOMENT`` ...);
- a cohort's results as numpy (``ClientBatch``: per-client results; ``ClusterSums``:
  per-cluster double-double partial sums) with their validation (``MalformedBatch``);
- their encoding in a Flower reply and back.

A reply's ``RecordDict`` holds
- ``"arrays"`` (train replies only): each parameter stacked over the cohort's clients, (B, ...);
- ``"clients"``: an ``ArrayRecord`` with ``client-id`` and ``num-examples`` (B,) and one
  ``metric.<name>`` array of per-client sums per metric;
- ``"metrics"``: a ``MetricRecord`` with the cohort's total ``num-examples`` and ``clients``
  (what Flower's own tooling expects to find).

k-model (clustered) train replies carry either the above (with each client's chosen cluster
as the per-client metric ``cluster``) or, instead of ``"arrays"``/``"clients"``, a ``"sums"``
record of per-cluster double-double partial sums. Any reply may add a ``"stats"`` record with
``outcomes`` (clients left out, by reason) and ``confusion`` (chosen x true cluster x size
bucket) counts; each part is optional and *absent* when unknown (device data carry no
labels, so no ``confusion``), never malformed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from proto.exact_sum import DD, dd_add, dd_sum

Params = dict[str, np.ndarray]

# ---- Phase 1 (coarse estimates): message, steps, reductions and statistic names ----------

COARSE_ACTION = "query.coarse"  # the message type of a Phase-1 step
SECOND_MOMENT = "second-moment"  # sums of y^2 x x' (Y2XX), y^2 (Y2) and n (N)
SECOND_MOMENT_PRODUCT = "second-moment-product"  # y^2 x (x'V) (Y2XV), y^2, n
ANCHOR_FIT = "anchor-fit"  # each anchor's fit inside a subspace (ESTIMATE rows)
ANCHOR_TRAIN = "anchor-train"  # each anchor's model trained from a common start (ESTIMATE rows)
NORMAL_EQUATIONS = "normal-equations"  # sums of X'X (XX), X'y (XY) and n (N): a global least-squares fit
CENTRE = "centre"  # a moment request's model: the moments are of the residuals y - <x, centre>
XX, XY = "xx", "xy"
# Second-order refinement: what a client sends instead of a trained model (per-example means,
# so that the example-weighted cluster sums are the cluster's X'X and X'y).
NORMAL_MATRIX, NORMAL_VECTOR = "normal-matrix", "normal-vector"
NORMAL_CONSTANT = "normal-constant"  # y'y/n per client: soft assignments score every cluster on the server
REDUCE_SUM, REDUCE_ROWS = "sum", "rows"  # statistics summed over clients, or one row per anchor
CLIENT_ID, ESTIMATE = "client-id", "estimate"
Y2XX, Y2XV, Y2, N = "y2xx", "y2xv", "y2", "n"

# Per-client metrics every k-model train reply carries.
CLUSTER, LOSS_BEFORE = "cluster", "loss-before"


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


def combine_sums(parts: list[ClusterSums]) -> ClusterSums | None:
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


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (what a round costs on the wire, less framing)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


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
    outcomes = content["stats"]["outcomes"].numpy()  # only this part: telemetry of every reply
    if outcomes.ndim != 1 or not np.issubdtype(outcomes.dtype, np.integer) or (outcomes < 0).any():
        raise MalformedBatch(f"unreadable outcome counts {outcomes!r}")
    return outcomes


def decode_confusion(content: RecordDict, shape: tuple[int, ...] | None) -> np.ndarray | None:
    """A cohort's confusion counts, or None when it sent none (clients without labels)."""
    if "stats" not in content or "confusion" not in content["stats"]:
        return None
    try:
        confusion = content["stats"]["confusion"].numpy()
    except (TypeError, ValueError) as err:
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
    cluster = batch.metrics.get(CLUSTER)
    if cluster is None or ((cluster != np.round(cluster)) | (cluster < 0) | (cluster >= k)).any():
        raise MalformedBatch(f"chosen clusters missing or outside [0, {k})")
    return batch
