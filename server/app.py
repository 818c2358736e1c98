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

from server import monitor
from server.record import RunObserver, RunRecord, new_run_dir
from server.run_config import client_view, resolve, round_lr, unflatten
from strategies import K_MODEL, build_strategy
from strategies.aggregation import Params
from strategies.cohort_reply import params_to_record, record_to_params
from workloads import workload_class
from workloads.base import Workload
from workloads.federation import OUTCOMES, num_nodes

NODE_WAIT_S = 120.0
PULL_INTERVAL_S = 0.005  # Flower's default 0.1 s poll dominates small rounds


class FederationError(RuntimeError):
    """The federation cannot run (e.g. the expected nodes never connected)."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float = NODE_WAIT_S) -> None:
    """Block until ``expected`` nodes are connected (Flower's registration race)."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {connected} of {expected} nodes connected after {timeout:.0f} s; a "
                f"federation of federation.clients / federation.cohort_size needs {expected} "
                f"nodes (with `flwr run`, pass --federation-config num-supernodes={expected})"
            )
        time.sleep(0.05)


def initial_models(workload: Workload, init: str, seed: int) -> Params:
    """The k models handed to a k-model strategy (``clustered.init``)."""
    k = workload.num_clusters
    base = workload.initial_parameters()
    if init == "zeros":
        return {n: np.zeros((k, *v.shape)) for n, v in base.items()}
    if init == "random":
        return workload.random_models(k, seed)
    truth = workload.true_parameters()
    if truth is None:
        raise ValueError(f"clustered.init = {init!r} needs true models; this workload has none")
    if init == "true-first":  # every model equal to the first true model
        return {n: np.repeat(v[:1], k, axis=0) for n, v in truth.items()}
    return truth


def flatten(params: Params) -> np.ndarray:
    """One model's arrays as one float64 vector, in the parameters' order."""
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in params.values()])


def placement_summary(placement: list[dict[str, Any]]) -> dict[str, Any]:
    """Which node (Ray node id, else host) ran which cohorts, and how many cohorts had to
    generate their data this round (0 after the first round with a data cache)."""
    nodes: dict[str, list[int]] = {}
    generated = 0
    devices: dict[str, Any] = {}
    for p in placement:
        try:  # telemetry from clients: an odd entry is skipped, never a crash
            partition = int(p.get("partition", -1))
        except (TypeError, ValueError):
            continue
        nodes.setdefault(str(p.get("ray-node") or p.get("host", "?")), []).append(partition)
        generated += p.get("generated") is True
        if isinstance(p.get("device"), dict):  # keyed by the device's first client id
            devices[str(partition)] = p["device"]
    out: dict[str, Any] = {
        "cohort_nodes": {n: sorted(parts) for n, parts in sorted(nodes.items())},
        "cohorts_generated": generated,
    }
    if devices:
        out["devices"] = dict(sorted(devices.items()))
    return out


def scored_metrics(
    workload: Workload, models: Params, confusion: np.ndarray | None, loss: float | None
) -> dict[str, Any]:
    """What the clients say about the models they received: the mean local loss, and, when
    they know their true clusters, the misclustering of their choices and the adjusted Rand
    index of the partition they form against the true one (``ari``)."""
    out: dict[str, Any] = {workload.loss_name: loss}
    if confusion is not None:
        extra = workload.central_metrics(models, confusion)
        out.update({m: v for m, v in extra.items() if m.startswith("misclustering")})
        if confusion.shape[0] > 1:  # one model: every client in one group, ARI says nothing
            out["ari"] = adjusted_rand(confusion)
    return out


def adjusted_rand(confusion: np.ndarray) -> float | None:
    """ARI of the clients' chosen models against their true clusters, from the (chosen x
    true x size bucket) counts, straight from the contingency table (Hubert and Arabie 1985;
    O(k^2) however many clients); None without clients, 1.0 when both partitions are trivial."""
    table = np.asarray(confusion, dtype=np.float64)
    table = table.reshape(table.shape[0], table.shape[1], -1).sum(axis=2)
    n = table.sum()
    if n == 0:
        return None

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * cols / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # one cluster on both sides (or single clients): perfect agreement
        return 1.0
    return (index - expected) / (maximum - expected)


def round_counts(metrics: dict[str, float], examples: int) -> dict[str, float]:
    """The workload's own per-round counts (e.g. labels queried) as totals: replies carry
    every metric as a per-example mean."""
    return {m: v * examples for m, v in metrics.items() if m not in ("loss-before", "cluster")}


def detection_rates(
    flags: dict[str, list[int]], participants: list[int] | None, malicious: np.ndarray
) -> dict[str, float | None]:
    """Per defense, the true positive rate (malicious clients flagged, of those taking
    part; None without any) and false positive rate (honest clients flagged)."""
    taking_part = set(participants) if participants is not None else set().union(*map(set, flags.values()))
    bad = taking_part & set(np.asarray(malicious).tolist())
    good = taking_part - bad
    out: dict[str, float | None] = {}
    for name, flagged in flags.items():
        hit = set(flagged)
        out[f"tpr_{name}"] = len(hit & bad) / len(bad) if bad else None
        out[f"fpr_{name}"] = len(hit & good) / len(good) if good else None
    return out


def arm_label(strategy: str, variant: str) -> str:
    """How the run record names a strategy run on one of the workload's variants."""
    return f"{strategy}/{variant}" if variant else strategy


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
) -> list[dict[str, Any]]:
    """Run one strategy (on one of the workload's variants) for ``run.rounds`` rounds;
    returns its per-round rows, recorded under ``arm_label(name, variant)``.

    Row r describes the models after round r (row 0: the models of round 1, i.e. the
    initial ones, or Phase 1's estimates for the clustered strategies): the workload's central
    metrics, then, once the next exchange has scored them on the clients, the mean local loss
    and the misclustering of the clients' choices. Rows r >= 1 also hold the clients
    aggregated per model, the examples they trained on, the workload's own per-round counts
    (totals, e.g. labels queried), dropped replies, nodes that never replied and the
    round's wall time.

    With a ``record``, a checkpoint is written after every round: the strategy object, the
    models, the rows and the random state, which is everything the server's next round
    depends on. ``resume`` (such a checkpoint) continues after its round.
    """
    label = arm_label(name, variant)
    run, train, fed = scenario["run"], scenario["train"], scenario["federation"]
    k_model = name in K_MODEL
    base = workload.initial_parameters()
    strategy = build_strategy(
        name, nodes, proximal_mu=train["proximal_mu"], k=workload.num_clusters,
        dim=sum(v.size for v in base.values()), seed=fed["seed"],
        clustered=scenario["clustered"], timeout=run["round_timeout"],
        start=flatten(base), lr=train["lr"], robust=scenario["robust"], server=workload,
    )
    malicious = workload.malicious_clients(variant)
    config = ConfigRecord(
        {
            "scenario": json.dumps(client_view(scenario), sort_keys=True),
            "local-steps": train["local_steps"],
            "lr": train["lr"],
            "variant": variant,
            "arm": label,  # clients keep state per arm
            "data-cache": data_cache,
        }
    )
    handed_in = initial_models(workload, scenario["clustered"]["init"], fed["seed"]) if k_model else base
    arrays = params_to_record(handed_in)
    rows: list[dict[str, Any]] = []
    first = 1
    if resume is None:
        observer.on_strategy_start(label, run["rounds"])
    else:  # the checkpoint's state replaces the fresh one, bit for bit
        strategy, arrays, rows = resume["strategy"], resume["arrays"], resume["rows"]
        random.setstate(resume["random"])
        first = resume["round"] + 1
        observer.on_strategy_resume(label, run["rounds"], rows)

    def stacked(record: Any) -> Params:
        """The models of an ArrayRecord on a leading model axis (one for FedAvg/FedProx)."""
        params = record_to_params(record)
        return params if k_model else {n: v[None] for n, v in params.items()}

    def scored(models: Params, report: Any, loss: str) -> dict[str, Any]:
        return scored_metrics(workload, models, report.confusion, report.metrics.get(loss))

    for rnd in range(first, run["rounds"] + 1):
        start = time.perf_counter()
        config["lr"] = round_lr(train, rnd, run["rounds"])
        messages = strategy.configure_train(rnd, arrays, config, grid)
        sent = getattr(strategy, "sent_models", None) or stacked(arrays)
        if rnd == 1:
            row0: dict[str, Any] = {"round": 0, **workload.central_metrics(sent)}
            if getattr(strategy, "coarse", None) is not None:  # Phase 1 replaced the models
                key = workload.key_metric
                row0[f"handed_in_{key}"] = workload.central_metrics(handed_in)[key]
                row0["phase1_warnings"] = strategy.coarse.warnings
            rows.append(row0)
        replies = list(grid.send_and_receive(messages, timeout=run["round_timeout"]))
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        report = strategy.last_report
        wall = time.perf_counter() - start
        rows[-1].update(scored(sent, report, "loss-before"))
        if rnd == 1:
            observer.on_round(label, rows[0])
        if new_arrays is not None:
            arrays = new_arrays
        if report.probes:
            workload.observe_probes(report.probes)
        row = {"round": rnd, **workload.central_metrics(stacked(arrays))}
        row["clients"] = report.clients
        row["examples"] = report.examples
        if report.outcomes is not None:  # clients left out of the round, by reason
            row.update(zip(OUTCOMES, report.outcomes.tolist()))
        if report.placement:
            row.update(placement_summary(report.placement))
        row.update(round_counts(report.metrics, report.examples))
        if report.cluster_sizes is not None:
            row["cluster_clients"] = report.cluster_sizes
        row.update(report.extra)
        if report.flags:
            row["flagged"] = report.flags
            row.update(detection_rates(report.flags, report.participants, malicious))
        row["dropped"] = len(report.dropped)
        if report.dropped:
            row["dropped_replies"] = report.dropped
        missing = sorted({m.metadata.dst_node_id for m in messages}
                         - {r.metadata.src_node_id for r in replies})
        if missing:  # e.g. a device went offline: the round went on without it
            row["missing_nodes"] = missing
        row["wall_time_s"] = wall
        if row.get("clipped"):
            log(logging.WARNING, "%s round %d: %g requested items clipped (clients' pools "
                "exhausted)", label, rnd, row["clipped"])
        rows.append(row)
        observer.on_round(label, row)
        if record is not None:
            record.save_checkpoint({"arm": label, "round": rnd, "strategy": strategy,
                                    "arrays": arrays, "rows": rows, "random": random.getstate()})
    # One evaluate exchange scores the final models.
    replies = grid.send_and_receive(
        strategy.configure_evaluate(run["rounds"], arrays, ConfigRecord(dict(config)), grid),
        timeout=run["round_timeout"],
    )
    strategy.aggregate_evaluate(run["rounds"], replies)
    rows[-1].update(scored(stacked(arrays), strategy.last_report, "loss"))
    final = workload.final_report(stacked(arrays))
    if final:
        rows[-1]["final"] = final
    observer.on_models(label, stacked(arrays))
    observer.on_strategy_end(label, rows)
    return rows


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
            random.seed(fed["seed"])  # Flower samples nodes with the global `random`
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
    scenario: dict[str, Any], resume: str | Path | None = None, out: str | Path | None = None
) -> RunRecord:
    """A new run record under ``out`` (default ``run.out``), or the interrupted one in
    ``resume``, reopened to continue."""
    if resume is None:
        return RunRecord(new_run_dir(out or scenario["run"]["out"], scenario["run"]["name"]), scenario)
    return RunRecord(Path(resume), scenario, resume=True)


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
    the run config; ``run.resume`` (a run directory) continues an interrupted run."""
    config = dict(context.run_config)
    resume = str(config.pop("run.resume", "") or "") or None
    scenario = resolve(unflatten(config), source="run config")
    record = open_record(scenario, resume)
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
