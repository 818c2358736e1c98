"""How a cohort's results travel in a Flower reply, and how the server reads them back.

A reply's ``RecordDict`` holds
- ``"arrays"`` (train replies only): each parameter stacked over the cohort's clients, (B, ...);
- ``"clients"``: an ``ArrayRecord`` with ``client-id`` and ``num-examples`` (B,) and one
  ``metric.<name>`` array of per-client sums per metric;
- ``"metrics"``: a ``MetricRecord`` with the cohort's total ``num-examples`` and ``clients``
  (what Flower's own tooling expects to find).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from strategies.aggregation import ClientBatch, MalformedBatch, Params, validate_batch

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
