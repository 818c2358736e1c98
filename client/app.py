"""The Flower ``ClientApp``: one node hosts a cohort of virtual clients.

The node finds its clients from its ``node_config`` (``partition-id`` of ``num-partitions``:
a contiguous slice of client ids) and rebuilds the workload from the scenario the server
sends in every message. Workloads and cohort data are cached in this importable module, so
a Ray actor generates a cohort's data once and reuses it across rounds and strategies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import cohort_store, device
from client.compute import begin_round, coarse_cohort, evaluate_cohort, train_cohort
from proto.wire import CLUSTER, ClientBatch, encode_batch, encode_result, params_to_record, record_to_params
from workloads import workload_class
from workloads.base import CohortData, Params, SimulatedAttacks, TrainSettings, Workload
from workloads.device_files import DeviceDataError
from workloads.federation import cohort_slice

_workloads: dict[str, Workload] = {}
_cohorts: dict[tuple[str, int, int], CohortData] = {}
_CACHE_LIMIT = 8  # scenarios kept per process (tests run many small ones)


def _one_thread() -> None:
    """Many small clients on few cores: one thread per client process is much faster."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def cohort(msg: Message, context: Context) -> tuple[Workload, CohortData, bool]:
    """The workload, this node's cohort data (cached per scenario and partition), and
    whether this call had to generate the data.

    With a ``data-cache`` folder in the config (the launcher sets one per run and machine),
    the data are generated once per machine and memory-mapped by every worker.
    """
    config = msg.content["config"]
    scenario_json = str(config["scenario"])
    if scenario_json not in _workloads:
        if len(_workloads) >= _CACHE_LIMIT:
            _workloads.clear()
            _cohorts.clear()
        scenario = json.loads(scenario_json)
        _workloads[scenario_json] = workload_class(scenario["run"]["workload"])(scenario)
        _one_thread()
    workload = _workloads[scenario_json]
    data_path = str(context.node_config.get("data-path", ""))
    if data_path:  # a device: its clients' files (raises DeviceDataError, sent as the reply)
        key = (scenario_json, data_path, 0)
        if key not in _cohorts:
            _cohorts[key] = workload.read_device_files(device.data_files(data_path))
        return workload, _cohorts[key], False
    pid = int(context.node_config["partition-id"])
    parts = int(context.node_config["num-partitions"])
    key = (scenario_json, pid, parts)
    generated = False
    if key not in _cohorts:
        ids = cohort_slice(pid, parts, workload.num_clients)
        root = str(config.get("data-cache", ""))
        if root:
            digest = hashlib.sha256(scenario_json.encode()).hexdigest()[:16]
            path = Path(root) / f"{digest}-{pid}-of-{parts}"
            _cohorts[key], generated = cohort_store.cached(path, lambda: workload.client_data(ids))
        else:
            _cohorts[key], generated = cohort_store.as_stored(workload.client_data(ids)), True
    return workload, _cohorts[key], generated


def placement(context: Context, generated: bool, data: CohortData) -> ConfigRecord:
    """Where this reply was computed (the run record shows which node ran which cohort)."""
    node = ""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        node = sys.modules["ray"].get_runtime_context().get_node_id()
    partition = context.node_config.get("partition-id", int(data.client_ids[0]))
    return ConfigRecord({
        "partition": int(partition), "ray-node": node,
        "host": socket.gethostname(), "pid": os.getpid(), "generated": generated,
    })


def remember(context: Context, config: ConfigRecord, batch: ClientBatch | None) -> ConfigRecord | None:
    """On a device with a ``state-dir``: read what it kept before this reply (its rounds
    and last clusters, which survive a SuperNode restart), then record this round."""
    state_dir = str(context.node_config.get("state-dir", ""))
    if not state_dir:
        return None
    store = device.DeviceState(state_dir)
    arm = str(config.get("arm", ""))
    before = store.arm(arm)
    clusters = None
    if batch is not None and CLUSTER in batch.metrics:
        clusters = dict(zip(batch.client_ids.tolist(), batch.metrics[CLUSTER].astype(int).tolist()))
    store.record_round(arm, int(config.get("server-round", 0)), clusters)
    return ConfigRecord({
        "rounds-before": int(before.get("rounds", 0)),
        "clusters-before": json.dumps(before.get("clusters", {}), sort_keys=True),
    })


def device_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A device whose data cannot be read answers with an error naming the file and the
    problem; the server records it and the round goes on without this device."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except DeviceDataError as err:
            return Message(Error(device.DEVICE_DATA_ERROR, f"device data: {err}"), reply_to=msg)

    return wrapped


def _settings(config: ConfigRecord) -> TrainSettings:
    return TrainSettings(
        local_steps=int(config["local-steps"]),
        lr=float(config["lr"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        step_cap=float(config.get("step-cap", 0.5)),
        variant=str(config.get("variant", "")),
    )


app = ClientApp()


def _state_key(config: ConfigRecord) -> str:
    return f"umbel.state/{config.get('arm', '')}"


def load_state(context: Context, config: ConfigRecord) -> Params | None:
    """The cohort's state for this arm (a stateful workload's memory between rounds).

    Flower keeps ``context.state`` per node for the whole run, whichever process serves it.
    """
    key = _state_key(config)
    return record_to_params(context.state[key]) if key in context.state else None


def received(msg: Message, context: Context) -> tuple[Workload, CohortData, bool, ConfigRecord, Params]:
    """A train or evaluate message unpacked: the workload, the cohort's data, whether this
    call generated them, the config and the model(s) sent."""
    workload, data, generated = cohort(msg, context)
    return workload, data, generated, msg.content["config"], record_to_params(msg.content["arrays"])


@app.train()
@device_errors
def train(msg: Message, context: Context) -> Message:
    workload, data, generated, config, params = received(msg, context)
    k_models = "k-models" in config
    models = params if k_models else {n: v[None] for n, v in params.items()}
    round_ = int(config["server-round"])
    data, state, extra = begin_round(
        workload, data, models, load_state(context, config), round_=round_,
        variant=str(config.get("variant", "")), federation=workload.federation,
    )
    if state is not None:
        context.state[_state_key(config)] = params_to_record(state)
    probe = None
    if isinstance(workload, SimulatedAttacks):  # what a simulated attacker reveals to the evaluator
        probe = workload.evaluation_probe(data, state, str(config.get("variant", "")))
    result = train_cohort(
        workload, data, models,
        selection=str(config["selection"]) if k_models else "single",
        reply=str(config["reply"]) if k_models else "clients",
        settings=_settings(config),
        round_=round_,
        federation=workload.federation,
        extra_metrics=extra,
        clipping_norm=float(config["clipping_norm"]) if "clipping_norm" in config else None,
        refine=str(config.get("refine", "first-order")),
        assignment=str(config.get("assignment", "hard")),
    )
    if not k_models and result.batch is not None:  # Flower's FedAvg/FedProx: one model
        result.batch.metrics.pop(CLUSTER)
    content = encode_result(result)
    content["node"] = placement(context, generated, data)
    if probe is not None:  # a simulated attacker's evaluation probe (never aggregated)
        content["probe"] = params_to_record(probe)
    kept = remember(context, config, result.batch)
    if kept is not None:
        content["device"] = kept
    return Message(content, reply_to=msg)


@app.evaluate()
@device_errors
def evaluate(msg: Message, context: Context) -> Message:
    workload, data, _, config, params = received(msg, context)
    state = load_state(context, config)
    if state is not None:
        data = workload.with_state(data, state)
    if "k-models" not in config:
        metrics = workload.local_evaluate(params, data)
        batch = ClientBatch(data.client_ids, data.num_examples, {}, metrics)
        return Message(encode_batch(batch), reply_to=msg)
    examples, (hi, lo), confusion = evaluate_cohort(workload, data, params, str(config["selection"]))
    content = RecordDict(
        {
            "eval": params_to_record({"examples": examples, "loss.hi": hi, "loss.lo": lo}),
            "metrics": MetricRecord({"num-examples": int(examples[0])}),
        }
    )
    if confusion is not None:
        content["stats"] = params_to_record({"confusion": confusion})
    return Message(content, reply_to=msg)


@app.query("coarse")
@device_errors
def coarse(msg: Message, context: Context) -> Message:
    """A Phase-1 step of a clustered strategy: statistics, never raw data."""
    workload, data, _ = cohort(msg, context)
    config = msg.content["config"]
    request = record_to_params(msg.content["request"])
    stats = coarse_cohort(workload, data, str(config["step"]), request, str(config["reduce"]))
    return Message(RecordDict({"stats": params_to_record(stats)}), reply_to=msg)
