"""Run a scenario on Flower's simulation engine (Ray backend).

One simulation runs all strategies of the scenario. Ray gets a temp dir of its own per run
(removed afterwards) unless the run attaches to an existing Ray cluster (``ray_address``),
which is the multi-machine path: start ``ray start --head`` on one machine, ``ray start
--address=...`` on the others, then ``umbel run --ray-address <head>:6379``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from server import interrupt
from server.app import arm_label, make_server_app, open_record, serve_monitor, start_recording
from server.flower_patches import quicker_engine_poll
from server.lock import LockHeld
from server.record import LOCK, DamagedRecord, NotWritable, RunObserver, RunRecord, record_status, writable_folder
from server.run_config import client_view
from simulations.report import write_report
from workloads import workload_class
from workloads.base import Stateful
from workloads.federation import num_nodes

STOPPING_GRACE_S = 15.0  # how long --resume waits for a stopped run's process to let go of its lock


class LaunchError(ValueError):
    """The run cannot start (bad launch option); nothing was written."""


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast on an unreachable cluster (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"--ray-address {address!r}: expected host:port (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        raise LaunchError(
            f"--ray-address {address}: no Ray head answers there ({err.strerror or err}); "
            "start one with `ray start --head --port=PORT`"
        ) from None


def available_memory() -> float | None:
    """Bytes the machine can still give (``MemAvailable``); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_warning(scenario: dict[str, Any], actors: int) -> str | None:
    """A refusal when the run's peak (stated in ``run.expected_peak_gib``, else the
    workload's estimate) exceeds the memory available now, naming the fields that drive
    it; None when it fits."""
    stated = scenario["run"]["expected_peak_gib"] * 2**30
    workload = workload_class(scenario["run"]["workload"])
    estimate = stated or workload.memory_estimate(scenario, actors)
    free = available_memory()
    if not estimate or free is None or estimate <= free:
        return None
    source = "stated in run.expected_peak_gib" if stated else "estimated"
    fields = []
    for dotted in workload.memory_fields:
        section, _, key = dotted.partition(".")
        fields.append(f"{dotted} ({scenario.get(section, {}).get(key)})")
    return (f"this run's peak memory ({source}: {estimate / 2**30:.1f} GiB) exceeds the "
            f"{free / 2**30:.1f} GiB available. It grows with {', '.join(fields)}: lower them, "
            "or use a bigger machine / a Ray cluster (--ray-address)")


class RunFailed(RuntimeError):
    """The simulation stopped before every strategy finished; the record says so."""


class RunInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run between rounds; the record is ``interrupted``."""

    def __init__(self, stop: interrupt.Interrupted, run_dir: Path, at: dict[str, Any]) -> None:
        self.exit_code, self.run_dir, self.at = stop.exit_code, run_dir, at
        where = f"after round {at['round']} of {at['arm']}" if at.get("arm") else "before its first round"
        super().__init__(f"{stop} {where}; continue with `umbel run --resume {run_dir}`")


class Observers(RunObserver):
    """Fan one run's events out to several observers."""

    def __init__(self, *observers: RunObserver) -> None:
        self.observers = observers

    def on_strategy_start(self, strategy: str, rounds: int) -> None:
        for o in self.observers:
            o.on_strategy_start(strategy, rounds)

    def on_round(self, strategy: str, row: dict[str, Any]) -> None:
        for o in self.observers:
            o.on_round(strategy, row)

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None:
        for o in self.observers:
            o.on_strategy_end(strategy, rows)

    def on_strategy_resume(self, strategy: str, rounds: int, rows: list[dict[str, Any]]) -> None:
        for o in self.observers:
            o.on_strategy_resume(strategy, rounds, rows)

    def on_models(self, strategy: str, models: dict[str, Any]) -> None:
        for o in self.observers:
            o.on_models(strategy, models)


def backend_config(
    ray_address: str | None, temp_dir: str | None, verbose: bool = False, client_cpus: float = 1,
    client_gpus: float = 0.0,
) -> dict[str, Any]:
    """Flower's Ray backend settings: one actor per ``client_cpus`` CPUs of the cluster, each
    holding ``client_gpus`` GPUs (the scenario's ``run.num_gpus``; a fraction shares a GPU)."""
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,  # client failures come back as error replies, named in the record
    }
    if verbose:
        init_args.update(logging_level=logging.INFO, log_to_driver=True)
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
        init_args["_temp_dir"] = temp_dir
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": float(client_gpus)}, "init_args": init_args}


def simulate(
    scenario: dict[str, Any],
    out: str | Path | None = None,
    ray_address: str | None = None,
    observer: RunObserver | None = None,
    verbose: bool = False,
    client_cpus: float = 1,
    warn: Callable[[str], None] = logging.getLogger("umbel").warning,
    resume: str | Path | None = None,
    on_monitor: Callable[[str], None] | None = None,
    force: bool = False,
) -> Path:
    """Run a resolved scenario; returns its run directory. Raises ``LaunchError`` before
    anything starts, ``RunFailed``, or ``RunInterrupted`` (SIGINT/SIGTERM: the run stops
    between rounds and can be resumed).

    ``client_cpus`` is the CPUs Ray reserves per actor (fewer actors when larger);
    ``warn`` receives warnings raised before the start; ``on_monitor`` the address of the
    live monitor. ``resume``: the run directory of an interrupted run of this scenario (see
    ``check_resumable``), continued from its last checkpoint. ``force``: start even when
    the memory estimate exceeds what the machine has.
    """
    if ray_address:
        check_ray_address(ray_address)
    fed = scenario["federation"]
    nodes = num_nodes(fed["clients"], fed["cohort_size"])
    too_big = memory_warning(scenario, actors=int((os.cpu_count() or 1) // client_cpus) or 1)
    if too_big and not force:
        raise LaunchError(f"{too_big}; --force starts it anyway")
    if too_big:
        warn(too_big)
    if resume is None:
        check_out_folder(out or scenario["run"]["out"])
    with interrupt.stop_on_signals():
        try:
            record = open_record(scenario, resume, out, warn=warn)
        except LockHeld as err:
            raise LaunchError(str(err)) from None
        try:
            return _run_recorded(scenario, record, observer, nodes, ray_address, verbose,
                                 client_cpus, on_monitor)
        finally:
            record.close()


def check_out_folder(out: str | Path) -> None:
    """``LaunchError`` unless run records can be written under ``out`` (made if missing)."""
    try:
        writable_folder(out)
    except NotWritable as err:
        raise LaunchError(f"--out {err}") from None


def _run_recorded(
    scenario: dict[str, Any], record: RunRecord, observer: RunObserver | None, nodes: int,
    ray_address: str | None, verbose: bool, client_cpus: float,
    on_monitor: Callable[[str], None] | None,
) -> Path:
    run_dir = record.dir
    tracker = tracker_for(scenario, run_dir.parent)
    observers = Observers(record, *([tracker] if tracker else []), *([observer] if observer else []))
    start_recording(record, scenario)
    served: list[Any] = []

    def serve() -> None:  # in the ServerApp thread, once Ray is up (see serve_monitor)
        import ray

        deadline = time.monotonic() + 300  # Flower starts Ray after the ServerApp's thread
        while not ray.is_initialized() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not served:
            served[:] = serve_monitor(record, scenario)
            if served[1] and on_monitor is not None:
                on_monitor(served[1])

    try:
        return _simulate(scenario, run_dir, record, observers, nodes, ray_address, verbose,
                         client_cpus, serve)
    except interrupt.Interrupted as stop:
        raise RunInterrupted(stop, run_dir, record.interrupt(stop.signal_name)) from None
    finally:
        if served and served[0] is not None:  # watchers have had the RunFinished event
            served[0].stop(grace=2).wait()
        if tracker is not None:
            status = record.history["status"]  # "running" only if something unforeseen broke the run
            tracker.finish(run_dir, status if status != "running" else "failed")


def tracker_for(scenario: dict[str, Any], out: Path) -> RunObserver | None:
    """The experiment tracker ``run.tracking`` asks for (None: none); its store is
    ``run.tracking_uri``, else a local one beside the run records (``out/mlruns``)."""
    if scenario["run"]["tracking"] != "mlflow":
        return None
    from simulations.tracking import MLflowTracker, default_uri

    try:
        return MLflowTracker(scenario, uri=scenario["run"]["tracking_uri"] or default_uri(out))
    except ImportError as err:
        raise LaunchError(str(err)) from None


def _simulate(
    scenario: dict[str, Any], run_dir: Path, record: RunRecord, observers: RunObserver,
    nodes: int, ray_address: str | None, verbose: bool, client_cpus: float,
    on_start: Callable[[], None],
) -> Path:
    from flwr.simulation import run_simulation  # heavy import: only when running

    from client.app import app as client_app

    # One BLAS/OpenMP thread per Ray worker: many small clients on few cores.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:  # Flower's per-round INFO lines and the run_simulation deprecation notice
        logging.getLogger("flwr").setLevel(logging.ERROR)
    temp_dir = None if ray_address else tempfile.mkdtemp(prefix="umbel-ray-", dir="/tmp")
    # Cohort data, written once per machine and memory-mapped by every worker there.
    data_cache = tempfile.mkdtemp(prefix="umbel-cohorts-", dir=temp_dir or "/tmp")
    for folder in (temp_dir, data_cache):  # removed by whoever takes over if this process is killed
        if folder:
            record.lock.add_temp_dir(folder)
    quicker_engine_poll(nodes)
    try:
        run_simulation(
            server_app=make_server_app(scenario, observers, data_cache, record, on_start),
            client_app=client_app,
            num_supernodes=nodes,
            backend_config=backend_config(ray_address, temp_dir, verbose, client_cpus,
                                          scenario["run"].get("num_gpus", 0.0)),
            verbose_logging=verbose,
        )
    except BaseException as err:
        if interrupt.requested():  # whatever the signal broke on its way out
            raise interrupt.Interrupted(interrupt.requested()) from None
        record.finish("failed", repr(err))
        raise RunFailed(f"run failed: {err} (record in {run_dir})") from err
    finally:
        shutil.rmtree(data_cache, ignore_errors=True)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    recorded = record.history["strategies"]
    if interrupt.requested() and any(len(recorded.get(arm, [])) != scenario["run"]["rounds"] + 1
                                     for arm in arm_labels(scenario)):
        raise interrupt.Interrupted(interrupt.requested())
    if any(len(recorded.get(arm, [])) != scenario["run"]["rounds"] + 1 for arm in arm_labels(scenario)):
        record.finish("failed", "the simulation ended before every strategy finished")
        raise RunFailed(f"run incomplete (record in {run_dir})")
    try:
        run_baselines(scenario, observers, skip=record.finished_arms())
    except interrupt.Interrupted:
        raise
    except Exception as err:
        record.finish("failed", f"baseline: {err!r}")
        raise RunFailed(f"baseline run failed: {err} (record in {run_dir})") from err
    record.finish("finished")
    write_report(run_dir)
    return run_dir


def check_resumable(run_dir: str | Path) -> dict[str, Any]:
    """The scenario of an interrupted run that ``simulate(resume=run_dir)`` can continue.

    Raises ``LaunchError`` naming what is wrong: not a run directory, already finished, or a
    workload whose clients keep state between rounds (that state lives on the clients, which
    a restarted simulation rebuilds from scratch, so the continuation would differ).
    """
    from server.lock import read_lock
    from server.record import HISTORY, SCENARIO, load_checkpoint, load_history
    from simulations.scenarios import load_scenario

    run_dir = Path(run_dir)
    for name in (SCENARIO, HISTORY):
        if not (run_dir / name).is_file():
            raise LaunchError(f"--resume {run_dir}: not a run directory ({name} is missing)")
    try:
        history = load_history(run_dir)
        load_checkpoint(run_dir)
    except DamagedRecord as err:
        raise LaunchError(f"--resume {run_dir}: {err}") from None
    status = record_status(run_dir, history)
    # A stopped run's process may still be exiting when its stop is reported (seen once: a
    # deployment's ServerApp held the lock just after the SuperLink said "stopped"): wait a
    # moment for it before calling the run live.
    deadline = time.monotonic() + STOPPING_GRACE_S
    while status == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        history = load_history(run_dir)
        status = record_status(run_dir, history)
    if status == "finished":
        raise LaunchError(f"--resume {run_dir}: that run has finished; nothing to resume")
    if status == "running":
        holder = read_lock(run_dir / LOCK) or {}
        raise LaunchError(f"--resume {run_dir}: the run is still going (process {holder.get('pid')}); "
                          f"stop it first (`kill -INT {holder.get('pid')}`)")
    scenario = load_scenario(str(run_dir / SCENARIO))
    workload = workload_class(scenario["run"]["workload"])
    if issubclass(workload, Stateful):
        raise LaunchError(
            f"--resume {run_dir}: {workload.name} clients keep state between rounds (e.g. "
            "labelled pools) that a restarted simulation cannot restore; rerun it instead"
        )
    return scenario


def arm_labels(scenario: dict[str, Any]) -> list[str]:
    """The federated arms of a scenario: every strategy on every workload variant."""
    workload = workload_class(scenario["run"]["workload"])(client_view(scenario))
    return [arm_label(s, v) for s in scenario["run"]["strategies"] for v in workload.variants()]


def with_overrides(scenario: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(scenario)
    for section, values in overrides.items():
        out[section].update(values)
    return out


def baseline_runs(scenario: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """The workload's reference runs as (their scenario, the strategy they run): the first of
    the overrides' ``run.strategies`` (default: FedAvg)."""
    cls = workload_class(scenario["run"]["workload"])
    return {name: (with_overrides(scenario, overrides), overrides.get("run", {}).get("strategies", ["fedavg"])[0])
            for name, overrides in cls.baselines(scenario).items()}


def run_baselines(scenario: dict[str, Any], observer: RunObserver, skip: set[str] = frozenset()) -> None:
    """The workload's reference runs outside the federation (e.g. one client holding all
    data), in this process, recorded as ``<baseline>/<variant>``. Each runs the first strategy
    of its overrides' ``run.strategies`` (default: FedAvg)."""
    from simulations.reference import Reference  # torch-heavy for some workloads

    for baseline, (baseline_scenario, strategy) in baseline_runs(scenario).items():
        ref = Reference(baseline_scenario)
        for variant in ref.workload.variants():
            label = arm_label(baseline, variant)
            if label in skip:  # a resumed run finished it before the interruption
                continue
            ref.run(strategy, variant=variant, keep_models=False, observer=observer, label=label)
