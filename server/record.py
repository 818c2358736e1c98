"""The run record: ``runs/<name>-<time>/`` with the resolved scenario and ``history.json``.

``history.json`` is rewritten after every round (atomically), so an interrupted run keeps
what it finished. Tables and plots are drawn from it by ``simulations.report``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import tomli_w

from workloads import workload_class

HISTORY = "history.json"
SCENARIO = "scenario.toml"


class RunObserver:
    """Callbacks of a run; the default does nothing."""

    def on_strategy_start(self, strategy: str, rounds: int) -> None: ...

    def on_round(self, strategy: str, row: dict[str, Any]) -> None: ...

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None: ...


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunRecord(RunObserver):
    """Writes the scenario once and the history after every round."""

    def __init__(self, run_dir: Path, scenario: dict[str, Any]) -> None:
        self.dir = run_dir
        workload = workload_class(scenario["run"]["workload"])
        self.history: dict[str, Any] = {
            "name": scenario["run"]["name"],
            "workload": scenario["run"]["workload"],
            "seed": scenario["federation"]["seed"],
            "key_metric": workload.key_metric,
            "loss_name": workload.loss_name,
            "higher_is_better": workload.higher_is_better,
            "curve_x": workload.curve_x,
            "status": "running",
            "strategies": {},
        }
        _write_atomic(run_dir / SCENARIO, tomli_w.dumps(_drop_none(scenario)))
        self._flush()

    def on_strategy_start(self, strategy: str, rounds: int) -> None:
        self.history["strategies"][strategy] = []

    def on_round(self, strategy: str, row: dict[str, Any]) -> None:
        # Rows are shared with the server loop, which fills a row's loss one round later.
        self.history["strategies"][strategy].append(row)
        self._flush()

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None:
        self._flush()

    def finish(self, status: str, error: str | None = None) -> None:
        self.history["status"] = status
        if error:
            self.history["error"] = error
        self._flush()

    def _flush(self) -> None:
        _write_atomic(self.dir / HISTORY, json.dumps(self.history, indent=1))


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
