"""The run record: ``runs/<name>-<time>/`` with the resolved scenario, ``history.json``,
the run's events (``events.pb``, see ``server.monitor``), each arm's final models
(``models/<arm>.npz``) and the server's last checkpoint (``checkpoint.pkl``).

``history.json`` is rewritten after every round (atomically), so an interrupted run keeps
what it finished. Tables and plots are drawn from it by ``simulations.report``.

One process writes a record at a time: ``run.lock`` (``server.lock``) names it, so a second
writer (``--resume`` of a run still going) is refused, and a record whose status says
``running`` but whose lock has no live owner was killed (``record_status``). A damaged file
is named with what is wrong (``DamagedRecord``), never a traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from server.lock import Lock, read_lock, pid_alive
from server.monitor import EVENTS, EventLog, scalar_metrics
from workloads import workload_class

HISTORY = "history.json"
SCENARIO = "scenario.toml"
CHECKPOINT = "checkpoint.pkl"
MODELS = "models"
LOCK = "run.lock"


class DamagedRecord(ValueError):
    """A file of a run record cannot be read; the message names it and what is wrong."""


class RunObserver:
    """Callbacks of a run; the default does nothing."""

    def on_strategy_start(self, strategy: str, rounds: int) -> None: ...

    def on_round(self, strategy: str, row: dict[str, Any]) -> None: ...

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None: ...

    def on_strategy_resume(self, strategy: str, rounds: int, rows: list[dict[str, Any]]) -> None:
        """A resumed arm continues after ``rows`` (its checkpoint's history)."""

    def on_models(self, strategy: str, models: dict[str, np.ndarray]) -> None:
        """An arm's final models (arrays on a leading model axis)."""


class NotWritable(ValueError):
    """A folder that cannot take files; the message names it and why."""


def writable_folder(folder: str | Path) -> Path:
    """``folder``, made if missing, once a file could be written in it; else ``NotWritable``."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise NotWritable(f"{folder}: it is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".umbel-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise NotWritable(f"{folder}: cannot write files there ({err.strerror or err})") from None
    return path


def new_run_dir(out: str | Path, name: str) -> Path:
    """A fresh ``<out>/<name>-<YYYYmmdd-HHMMSS>`` (suffixed when the second is taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out) / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


class RunRecord(RunObserver):
    """Writes the scenario once, the history after every round and every event as it
    happens. ``resume=True`` reopens an interrupted run's record in ``run_dir``."""

    def __init__(self, run_dir: Path, scenario: dict[str, Any], resume: bool = False,
                 warn: Any = None) -> None:
        self.dir = Path(run_dir)
        self.lock = Lock(self.dir / LOCK, f"run record {self.dir}")
        self.lock.acquire(warn)  # LockHeld: another process writes this record
        try:
            self.events = EventLog(self.dir / EVENTS)
        except ValueError as err:
            self.lock.release()
            raise DamagedRecord(str(err)) from None
        if resume:
            self.history = load_history(self.dir)
            self.history["status"] = "running"
            self.history.pop("error", None)
            self.history.pop("interrupted_at", None)
            self._flush()
            return
        workload = workload_class(scenario["run"]["workload"])
        self.history = {
            "name": scenario["run"]["name"],
            "workload": scenario["run"]["workload"],
            "seed": scenario["federation"]["seed"],
            "key_metric": workload.key_metric_for(scenario),
            "loss_name": workload.loss_name,
            "higher_is_better": workload.higher_is_better,
            "curve_x": workload.curve_x,
            "summary_metrics": list(workload.summary_metrics),
            "plot_metrics": list(workload.plot_metrics),
            "reference_lines": {m: list(ref) for m, ref in workload.reference_lines.items()},
            "status": "running",
            "strategies": {},
        }
        _write_atomic(run_dir / SCENARIO, tomli_w.dumps(_drop_none(scenario)))
        self._flush()

    def start(self, arms: list[str], rounds: int, resumed: tuple[str, int] = ("", 0)) -> None:
        """The run begins (or resumes at ``resumed``: the arm and its last finished round)."""
        h = self.history
        self.events.emit(
            "run_started", run_name=h["name"], workload=h["workload"], arms=arms,
            rounds=rounds, seed=h["seed"], run_dir=str(self.dir.resolve()),
            key_metric=h["key_metric"], resumed_arm=resumed[0], resumed_from_round=resumed[1],
        )

    def finished_arms(self) -> set[str]:
        """Arms (and baselines) that ran to their end; a resumed run skips them."""
        return set(self.history.get("finished_arms", []))

    def on_strategy_start(self, strategy: str, rounds: int) -> None:
        self.history["strategies"][strategy] = []

    def on_strategy_resume(self, strategy: str, rounds: int, rows: list[dict[str, Any]]) -> None:
        """Its history is the checkpoint's rows (rounds after the checkpoint are redone)."""
        self.history["strategies"][strategy] = list(rows)
        self._flush()

    def on_round(self, strategy: str, row: dict[str, Any]) -> None:
        # Rows are shared with the server loop, which fills a row's loss one round later.
        self.history["strategies"][strategy].append(row)
        self._flush()
        for reason in row.get("dropped_replies", []):
            self.events.emit("client_failure", arm=strategy, round=row["round"], reason=reason)
        for node in row.get("missing_nodes", []):
            self.events.emit("client_failure", arm=strategy, round=row["round"], node=str(node),
                             reason="no reply within run.round_timeout")
        self.events.emit(
            "round_finished", arm=strategy, round=row["round"], metrics=scalar_metrics(row),
            cluster_sizes=[int(c) for c in row.get("cluster_clients", [])],
            clients=int(row.get("clients", 0)),
            failures=int(row.get("dropped", 0)) + len(row.get("missing_nodes", [])),
            wall_time_s=float(row.get("wall_time_s", 0.0)),
        )

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None:
        self.history.setdefault("finished_arms", []).append(strategy)
        self._flush()

    def on_models(self, strategy: str, models: dict[str, np.ndarray]) -> None:
        path = self.dir / MODELS / f"{strategy.replace('/', '__')}.npz"
        path.parent.mkdir(exist_ok=True)
        np.savez(path, **models)

    def finish(self, status: str, error: str | None = None) -> None:
        self.history["status"] = status
        if error:
            self.history["error"] = error
        self._flush()
        self.events.emit("run_finished", status=status, error=error or "")

    def interrupt(self, signal_name: str) -> dict[str, Any]:
        """The run stopped on a signal: status ``interrupted``, with the last complete round
        (``interrupted_at``: the arm and its round; -1 when no arm started)."""
        self.history["interrupted_at"] = last_complete_round(self.history)
        self.finish("interrupted", f"stopped by {signal_name}")
        return self.history["interrupted_at"]

    def close(self) -> None:
        """Release the record (its lock); nothing more is written."""
        self.lock.release()

    # -- the server's checkpoint: what a resumed run needs to continue bit for bit --------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        _write_atomic(self.dir / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_checkpoint(self) -> dict[str, Any] | None:
        return load_checkpoint(self.dir)

    def _flush(self) -> None:
        _write_atomic(self.dir / HISTORY, json.dumps(self.history, indent=1))


def load_models(run_dir: Path, arm: str) -> dict[str, np.ndarray]:
    """An arm's final models from a run record."""
    with np.load(Path(run_dir) / MODELS / f"{arm.replace('/', '__')}.npz") as f:
        return {k: f[k] for k in f.files}


def load_history(run_dir: Path) -> dict[str, Any]:
    """A record's history; ``FileNotFoundError`` when absent, ``DamagedRecord`` naming the
    file and the fault when it cannot be read."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {HISTORY} is missing")
    try:
        history = json.loads(path.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedRecord(
            f"{path} is damaged ({err}; {path.stat().st_size} bytes): nothing could be recovered "
            f"from it; the run's events ({EVENTS}) and final models ({MODELS}/) are separate files"
        ) from None
    problem = None if isinstance(history, dict) else f"a JSON {type(history).__name__}, not an object"
    if problem is None:
        missing = [k for k in ("name", "status", "strategies", "key_metric") if k not in history]
        problem = f"no {', '.join(missing)}" if missing else None
    if problem:
        raise DamagedRecord(f"{path} is damaged ({problem}): not a run history")
    return history


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The server's last checkpoint (None when the run wrote none); ``DamagedRecord`` when
    it cannot be read."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = pickle.loads(path.read_bytes())
        if not isinstance(state, dict) or not {"arm", "round", "strategy", "arrays", "rows", "random"} <= set(state):
            raise ValueError("not a server checkpoint")
    except Exception as err:  # a torn or foreign pickle raises anything from EOFError on
        raise DamagedRecord(
            f"{path} is damaged ({type(err).__name__}: {err}): nothing could be recovered from it; "
            f"delete it to resume from the start of the unfinished arm (finished arms are kept)"
        ) from None
    return state


def last_complete_round(history: dict[str, Any]) -> dict[str, Any]:
    """The arm that ran last and its last recorded round (-1: no arm recorded a round)."""
    arms = history.get("strategies", {})
    if not arms:
        return {"arm": "", "round": -1}
    arm, rows = list(arms.items())[-1]
    return {"arm": arm, "round": int(rows[-1]["round"]) if rows else -1}


def record_status(run_dir: Path, history: dict[str, Any] | None = None) -> str:
    """What the record says, corrected by its lock: ``running`` only while a live process
    holds it; a record left at ``running`` by a killed process reads ``killed at round N of
    ARM``; ``interrupted at round N of ARM`` after a signal."""
    history = history if history is not None else load_history(run_dir)
    status = history.get("status", "?")
    if status == "running":
        lock = read_lock(Path(run_dir) / LOCK)
        if lock is not None and pid_alive(lock["pid"]):
            return "running"
        at = last_complete_round(history)
        return f"killed at round {at['round']} of {at['arm']}" if at["arm"] else "killed before its first round"
    if status == "interrupted":
        at = history.get("interrupted_at") or last_complete_round(history)
        return f"interrupted at round {at['round']} of {at['arm']}" if at.get("arm") else "interrupted"
    return status


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: leave unset optional keys out of the written scenario."""
    return {
        k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None
    }
