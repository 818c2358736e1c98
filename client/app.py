"""The Flower ``ClientApp``: one node hosts a cohort of virtual clients.

The node finds its clients from its ``node_config`` (``partition-id`` of ``num-partitions``:
a contiguous slice of client ids) and rebuilds the workload from the scenario the server
sends in every message. Workloads and cohort data are cached in this importable module, so
a Ray actor generates a cohort's data once and reuses it across rounds and strategies.
"""

from __future__ import annotations

import json
import sys

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from strategies.aggregation import ClientBatch
from strategies.cohort_reply import encode_batch, record_to_params
from workloads import workload_class
from workloads.base import CohortData, TrainSettings, Workload, stack_params
from workloads.federation import cohort_slice

_workloads: dict[str, Workload] = {}
_cohorts: dict[tuple[str, int, int], CohortData] = {}
_CACHE_LIMIT = 8  # scenarios kept per process (tests run many small ones)


def _one_thread() -> None:
    """Many small clients on few cores: one thread per client process is much faster."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def cohort(msg: Message, context: Context) -> tuple[Workload, CohortData]:
    """The workload and this node's cohort data (cached per scenario and partition)."""
    scenario_json = str(msg.content["config"]["scenario"])
    if scenario_json not in _workloads:
        if len(_workloads) >= _CACHE_LIMIT:
            _workloads.clear()
            _cohorts.clear()
        scenario = json.loads(scenario_json)
        _workloads[scenario_json] = workload_class(scenario["run"]["workload"])(scenario)
        _one_thread()
    workload = _workloads[scenario_json]
    pid = int(context.node_config["partition-id"])
    parts = int(context.node_config["num-partitions"])
    key = (scenario_json, pid, parts)
    if key not in _cohorts:
        ids = cohort_slice(pid, parts, workload.num_clients)
        _cohorts[key] = workload.client_data(ids)
    return workload, _cohorts[key]


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    workload, data = cohort(msg, context)
    params = record_to_params(msg.content["arrays"])
    config = msg.content["config"]
    settings = TrainSettings(
        local_steps=int(config["local-steps"]),
        lr=float(config["lr"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    counts = data.num_examples
    loss_before = workload.local_loss(params, data) * counts
    trained = workload.local_train(stack_params(params, len(counts)), data, settings)
    batch = ClientBatch(data.client_ids, counts, trained, {"loss-before": loss_before})
    return Message(encode_batch(batch), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    workload, data = cohort(msg, context)
    params = record_to_params(msg.content["arrays"])
    metrics = workload.local_evaluate(params, data)
    batch = ClientBatch(data.client_ids, data.num_examples, {}, metrics)
    return Message(encode_batch(batch), reply_to=msg)
