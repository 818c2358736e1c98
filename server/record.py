"""The run record: ``runs/<name>-<time>/`` with the resolved scenario, ``history.json``,
the run's events (``events.pb``, see ``server.monitor``), each arm's final models
(``models/<arm>.npz``) and the server's last checkpoint (``checkpoint.pkl``).

``history.json`` is rewritten after every round (atomically), so an interrupted run keeps
what it finished. Tables and plots are drawn from it by ``simulations.report``.
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

from server.monitor import EVENTS, EventLog, scalar_metrics
from workloads import workload_class

HISTORY = "history.json"
SCENARIO = "scenario.toml"
CHECKPOINT = "checkpoint.pkl"
MODELS = "models"


class RunObserver:
    """Callbacks of a run; the default does nothing."""

    def on_strategy_start(self, strategy: str, rounds: int) -> None: ...

    def on_round(self, strategy: str, row: dict[str, Any]) -> None: ...

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None: ...

    def on_strategy_resume(self, strategy: str, rounds: int, rows: list[dict[str, Any]]) -> None:
        """A resumed arm continues after ``rows`` (its checkpoint's history)."""

    def on_models(self, strategy: str, models: dict[str, np.ndarray]) -> None:
        """An arm's final models (arrays on a leading model axis)."""


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

    def __init__(self, run_dir: Path, scenario: dict[str, Any], resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.events = EventLog(self.dir / EVENTS)
        if resume:
            self.history = load_history(self.dir)
            self.history["status"] = "running"
            self.history.pop("error", None)
            self._flush()
            return
        workload = workload_class(scenario["run"]["workload"])
        self.history = {
            "name": scenario["run"]["name"],
            "workload": scenario["run"]["workload"],
            "seed": scenario["federation"]["seed"],
            "key_metric": workload.key_metric,
            "loss_name": workload.loss_name,
            "higher_is_better": workload.higher_is_better,
            "curve_x": workload.curve_x,
            "summary_metrics": list(workload.summary_metrics),
            "plot_metrics": list(workload.plot_metrics),
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

    # -- the server's checkpoint: what a resumed run needs to continue bit for bit --------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        _write_atomic(self.dir / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.dir / CHECKPOINT
        return pickle.loads(path.read_bytes()) if path.is_file() else None

    def _flush(self) -> None:
        _write_atomic(self.dir / HISTORY, json.dumps(self.history, indent=1))


def load_models(run_dir: Path, arm: str) -> dict[str, np.ndarray]:
    """An arm's final models from a run record."""
    with np.load(Path(run_dir) / MODELS / f"{arm.replace('/', '__')}.npz") as f:
        return {k: f[k] for k in f.files}


def load_history(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {HISTORY} is missing")
    return json.loads(path.read_text())


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: leave unset optional keys out of the written scenario."""
    return {
        k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None
    }
