"""The Flower ``ServerApp``: runs every strategy of a scenario on one federation.

One simulation (one Ray start-up) serves all strategies of a scenario, one after another;
clients keep their generated data between strategies. Each round is one train exchange:
replies carry each client's loss under the model it received, which is the loss of the
previous round's model, so no separate evaluate exchange is needed until the last round.

``make_server_app`` builds a ServerApp for a resolved scenario (the launcher's path);
the module-level ``app`` reads the scenario from Flower's run config (``flwr run .``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from proto.wire import Params, params_to_record
from server import interrupt, monitor
from server.engine import Arm, ArmObserver, run_arm
from server.flower_patches import skip_forced_collections
from server.history import Checkpointer, History
from server.record import RunObserver, RunRecord, new_run_dir
from server.run_config import client_view, label_settings, round_lr, scenario_from_run_config
from strategies import K_MODEL, STRATEGIES, ReportingStrategy, build_strategy, catalog
from strategies.data_union import UploadTrainer
from workloads import streams, workload_class
from workloads.base import KnownClusters, TrainsOnUploads, Workload
from workloads.federation import num_nodes

NODE_WAIT_S = 120.0
PULL_INTERVAL_S = 0.005  # Flower's default 0.1 s poll dominates small rounds


class FederationError(RuntimeError):
    """The federation cannot run (e.g. the expected nodes never connected)."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float = NODE_WAIT_S) -> None:
    """Block until ``expected`` nodes are connected (Flower's registration race)."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected:
        interrupt.check()
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {connected} of {expected} nodes connected after {timeout:.0f} s; a "
                f"federation of federation.clients / federation.cohort_size needs {expected} "
                f"nodes (with `flwr run`, pass --federation-config num-supernodes={expected})"
            )
        time.sleep(0.05)


def initial_models(workload: Workload, init: str, seed: int, scale: float = 1.0) -> Params:
    """The k models handed to a k-model strategy (``clustered.init``; ``scale``: of the
    bernoulli starts, ``clustered.init_scale``)."""
    k = workload.num_clusters
    base = workload.initial_parameters()
    if init == "zeros":
        return {n: np.zeros((k, *v.shape)) for n, v in base.items()}
    if init == "random":
        return workload.random_models(k, seed)
    if init == "bernoulli":  # IFCA's synthetic starts: every coordinate scale x Bernoulli(1/2)
        rng = np.random.default_rng(np.random.SeedSequence([seed, streams.BERNOULLI_INIT]))
        return {n: scale * rng.integers(0, 2, size=(k, *v.shape)).astype(np.float64) for n, v in base.items()}
    truth = workload.true_parameters() if isinstance(workload, KnownClusters) else None
    if truth is None:
        raise ValueError(f"clustered.init = {init!r} needs true models; this workload has none")
    if init == "true-first":  # every model equal to the first true model
        return {n: np.repeat(v[:1], k, axis=0) for n, v in truth.items()}
    return truth


def flatten(params: Params) -> np.ndarray:
    """One model's arrays as one float64 vector, in the parameters' order."""
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in params.values()])


def arm_label(strategy: str, variant: str) -> str:
    """How the run record names a strategy run on one of the workload's variants."""
    return f"{strategy}/{variant}" if variant else strategy


def upload_trainer(workload: Workload) -> UploadTrainer | None:
    """What ``data-union`` trains with, when the workload trains on uploads."""
    if not isinstance(workload, TrainsOnUploads):
        return None
    return UploadTrainer(workload.server_train, workload.upload_spec(), workload.upload_classes)


def strategy_for(label: str, scenario: dict[str, Any], workload: Workload, nodes: int) -> ReportingStrategy:
    """The strategy a label of ``run.strategies`` runs, with its settings, for ``nodes``
    cohorts: umbel's own (its sections, overridden by its ``[strategy.<label>]`` table),
    a Python object handed to ``umbel.simulate``, or a Flower strategy (``catalog``)."""
    name = catalog.target(scenario, label)
    if name in STRATEGIES:
        own, base = label_settings(scenario, label), workload.initial_parameters()
        return build_strategy(
            name, nodes, proximal_mu=own["train"]["proximal_mu"], k=workload.num_clusters,
            dim=sum(v.size for v in base.values()), seed=scenario["federation"]["seed"],
            clustered=own["clustered"], timeout=scenario["run"]["round_timeout"],
            start=flatten(base), lr=own["train"]["lr"], robust=own["robust"],
            uploads=upload_trainer(workload),
        )
    skip_forced_collections()  # Flower's strategies collect garbage once per client reply otherwise
    inner = catalog.live_object(label) if name == catalog.LIVE else \
        catalog.build_flower(scenario, label, nodes, scenario["train"]["lr"])
    return inner if isinstance(inner, ReportingStrategy) else catalog.FlowerAdapter(inner, label)


def client_config(scenario: dict[str, Any], label: str = "", variant: str = "", data_cache: str = "",
                  train: dict[str, Any] | None = None) -> ConfigRecord:
    """What every message of an arm tells the clients: the scenario they rebuild their
    workload from, the local training settings (``train``: the arm's, default the
    scenario's), the arm (clients keep state per arm) and variant, and where cohorts cache
    their data (``data_cache``; empty: in memory)."""
    train = train or scenario["train"]
    return ConfigRecord({
        "scenario": json.dumps(client_view(scenario), sort_keys=True),
        "local-steps": train["local_steps"],
        "lr": train["lr"],
        "step-cap": train["step_cap"],
        "variant": variant,
        "arm": label,
        "data-cache": data_cache,
    })


def new_arm(name: str, scenario: dict[str, Any], workload: Workload, nodes: int, variant: str = "",
            data_cache: str = "", start: Params | None = None, label: str | None = None) -> tuple[Arm, Params]:
    """An arm ready for round 1, and the models handed to it (stacked on a model axis).

    ``start`` overrides the models handed in (one model, or k stacked for a k-model
    strategy); by default the workload's initial model, or ``clustered.init``'s k models.
    ``label`` names the arm (default ``arm_label(name, variant)``)."""
    run, fed, own = scenario["run"], scenario["federation"], label_settings(scenario, name)
    train, clustered = own["train"], own["clustered"]  # the label's own, over the scenario's
    k_model = catalog.target(scenario, name) in K_MODEL
    if start is None:
        start = initial_models(workload, clustered["init"], fed["seed"], clustered["init_scale"]) if k_model \
            else workload.initial_parameters()
    label = label or arm_label(name, variant)
    arm = Arm(label=label, strategy=strategy_for(name, scenario, workload, nodes), arrays=params_to_record(start),
              config=client_config(scenario, label, variant, data_cache, train), rounds=run["rounds"],
              timeout=run["round_timeout"], lr=lambda rnd: round_lr(train, rnd, run["rounds"]))
    return arm, start if k_model else {n: v[None] for n, v in start.items()}


def run_strategy(
    grid: Grid,
    name: str,
    scenario: dict[str, Any],
    workload: Workload,
    nodes: int,
    observer: RunObserver,
    variant: str = "",
    data_cache: str = "",
    record: RunRecord | None = None,
    resume: dict[str, Any] | None = None,
    start: Params | None = None,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Run one strategy (on one of the workload's variants) for ``run.rounds`` rounds on the
    round engine; returns its rows (``server.history``), recorded under ``label`` (default
    ``arm_label(name, variant)``).

    With a ``record``, a checkpoint is written after every round; ``resume`` (such a
    checkpoint) continues after its round, bit for bit."""
    arm, handed_in = new_arm(name, scenario, workload, nodes, variant, data_cache, start, label)
    rows = None
    if resume is not None:  # the checkpoint's state replaces the fresh one
        arm.strategy, arm.arrays, rows = resume["strategy"], resume["arrays"], resume["rows"]
        random.setstate(resume["random"])
        if "numpy_random" in resume:  # checkpoints before Flower's DP wrappers had none
            np.random.set_state(resume["numpy_random"])
        arm.first_round = resume["round"] + 1
    history = History(workload, observer, handed_in, variant, rows)
    observers: list[ArmObserver] = [history]
    if record is not None:
        observers.append(Checkpointer(record, history))
    run_arm(grid, arm, observers)
    return history.rows


def seed_globals(seed: int) -> None:
    """Before every arm: Flower samples nodes with the global ``random``, and its DP wrappers
    draw their noise from numpy's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


def run_federation(
    grid: Grid,
    scenario: dict[str, Any],
    observer: RunObserver,
    data_cache: str = "",
    record: RunRecord | None = None,
) -> None:
    """Every strategy of the scenario, in order, on the same federation and seed.

    ``data_cache``: a folder (on each client machine) where cohorts store their generated
    data once for all workers; empty: each worker keeps its own copy in memory.
    ``record``: the run record, which gets a checkpoint after every round; when it holds
    one already (a resumed run), finished arms are skipped and the checkpoint's arm
    continues after its last round."""
    workload = workload_class(scenario["run"]["workload"])(client_view(scenario))
    fed = scenario["federation"]
    nodes = num_nodes(fed["clients"], fed["cohort_size"])
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = PULL_INTERVAL_S
    wait_for_nodes(grid, nodes)
    finished = record.finished_arms() if record is not None else set()
    checkpoint = record.load_checkpoint() if record is not None else None
    for name in scenario["run"]["strategies"]:
        for variant in workload.variants():
            label = arm_label(name, variant)
            if label in finished:
                continue
            resume = checkpoint if checkpoint and checkpoint["arm"] == label else None
            seed_globals(fed["seed"])
            run_strategy(grid, name, scenario, workload, nodes, observer, variant, data_cache,
                         record=record, resume=resume)


def make_server_app(
    scenario: dict[str, Any], observer: RunObserver, data_cache: str = "",
    record: RunRecord | None = None, on_start: Any = None,
) -> ServerApp:
    """A ServerApp bound to a resolved scenario (used by the simulation launcher);
    ``on_start()`` runs first (the simulation engine and Ray are up by then)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        if on_start is not None:
            on_start()
        run_federation(grid, scenario, observer, data_cache, record)

    return server_app


def open_record(
    scenario: dict[str, Any], resume: str | Path | None = None, out: str | Path | None = None,
    warn: Any = None,
) -> RunRecord:
    """A new run record under ``out`` (default ``run.out``), or the interrupted one in
    ``resume``, reopened to continue. Either way this process holds its lock until
    ``record.close()`` (``server.lock.LockHeld`` when another process does; ``warn`` hears
    of a stale lock taken over)."""
    if resume is None:
        return RunRecord(new_run_dir(out or scenario["run"]["out"], scenario["run"]["name"]), scenario, warn=warn)
    return RunRecord(Path(resume), scenario, resume=True, warn=warn)


def start_recording(record: RunRecord, scenario: dict[str, Any]) -> None:
    """Emit the run's start (or its resumption after the record's checkpoint)."""
    workload = workload_class(scenario["run"]["workload"])(client_view(scenario))
    arms = [arm_label(s, v) for s in scenario["run"]["strategies"] for v in workload.variants()]
    checkpoint = record.load_checkpoint()
    resumed = (checkpoint["arm"], checkpoint["round"]) if checkpoint else ("", 0)
    record.start(arms, scenario["run"]["rounds"], resumed)


def serve_monitor(record: RunRecord, scenario: dict[str, Any]) -> tuple[Any, str]:
    """Serve the record's events on ``run.monitor`` (unless empty); returns the gRPC server
    (None when off) and the address it listens on, also written to the record.

    Start it after Ray: a process that forks while gRPC's threads run (Ray starting its
    services) can leave a child stuck, and Ray's start-up then times out."""
    if not scenario["run"]["monitor"]:
        return None, ""
    server, address = monitor.serve(record.events, scenario["run"]["monitor"])
    monitor.write_address(record.dir, address)
    return server, address


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .`` (and ``umbel deploy run``): the scenario comes from
    the run config's ``scenario`` (a built-in name or TOML text); ``resume`` (a run
    directory) continues an interrupted run."""
    scenario, resume = scenario_from_run_config(dict(context.run_config))
    record = open_record(scenario, resume, warn=lambda text: log(logging.WARNING, "umbel: %s", text))
    log(logging.INFO, "umbel: run record in %s", record.dir)
    start_recording(record, scenario)
    server, address = serve_monitor(record, scenario)
    if address:
        log(logging.INFO, "umbel: live monitor at %s (umbel watch %s)", address, address)
    try:
        run_federation(grid, scenario, record, record=record)
        record.finish("finished")
    except BaseException as err:
        record.finish("failed", repr(err))
        raise
    finally:
        if server is not None:  # watchers have had the RunFinished event
            server.stop(grace=2).wait()
        record.close()
