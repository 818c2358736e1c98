"""MLflow tracking of umbel runs (``--mlflow``, ``[run] tracking = "mlflow"``).

One MLflow run per umbel run (the *parent*: the resolved scenario as params ``section.key``,
the run record's ``summary.md``, plots, ``scenario.toml`` and ``history.json`` as artefacts)
and one nested run per arm (tag ``mlflow.parentRunId``; params ``arm`` and ``strategy``;
every round's finite scalar metrics at ``step = round``). Baselines are arms too.

The default store is SQLite, ``sqlite:///<out>/mlruns/mlflow.db`` with the artefacts in
``<out>/mlruns/artifacts/`` (``default_uri``): MLflow 3 made SQLite its default and keeps the
``./mlruns`` file store for old data only; SQLite also takes concurrent writers (two runs
into one store) and ``mlflow ui --backend-store-uri`` reads it directly. Any other tracking
URI works too (``http://host:5000`` for a tracking server).

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent
``mlflow.start_run`` stack: the ServerApp calls the observer from its own thread and arms
must not pick up each other's active run. mlflow is imported only when a tracker is made.
Once the runs exist, a failure to log (a tracking server gone away) is warned about once
and does not stop the umbel run.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.record import RunObserver

INSTALL_HINT = "pip install 'umbel[tracking]'"
STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
ARTEFACTS = ("summary.md", "scenario.toml", "history.json")
MAX_PARAM = 6000  # MLflow's longest param value
log = logging.getLogger("umbel")


def _mlflow() -> Any:
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError as err:
        raise ImportError(f"MLflow tracking needs mlflow, which is not installed ({err}): "
                          f"{INSTALL_HINT}") from None
    return mlflow


def default_uri(out: str | Path) -> str:
    """The local store next to the run records: ``sqlite:///<out>/mlruns/mlflow.db``."""
    return f"sqlite:///{(Path(out) / 'mlruns' / 'mlflow.db').resolve()}"


def _local_sqlite(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def flatten_scenario(scenario: dict[str, Any]) -> dict[str, str]:
    """``section.key`` -> the value as text (lists and tables as JSON); unset keys left out."""
    params: dict[str, str] = {}
    for section, values in scenario.items():
        if not isinstance(values, dict):
            params[section] = _text(values)
            continue
        for key, value in values.items():
            if value is not None:
                params[f"{section}.{key}"] = _text(value)
    return params


def _text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 3] + "..."


def metric_key(key: str) -> str:
    """``key`` in the characters MLflow takes in a metric name (others become ``_``)."""
    return re.sub(r"[^\w\-. /:]", "_", str(key))


def scalar(value: Any) -> float | None:
    """A finite real number as float; None for bools, lists, tables, NaN and infinities."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Arm:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.rows: list[dict[str, Any]] = []  # shared with the server: filled in later
        self.logged: set[tuple[int, str]] = set()


class MLflowTracker(RunObserver):
    """Logs one umbel run to MLflow; ``finish`` closes it. ``uri``: a tracking URI (default
    ``default_uri(scenario's run.out)``); ``experiment``: default the scenario's ``run.name``."""

    def __init__(self, scenario: dict[str, Any], uri: str | None = None,
                 experiment: str | None = None) -> None:
        _mlflow()
        from mlflow.tracking import MlflowClient

        self.scenario = scenario
        run = scenario["run"]
        self.uri = uri or default_uri(run.get("out", "runs"))
        self.experiment = experiment or run["name"]
        db = _local_sqlite(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(db.parent / "artifacts" if db is not None else None)
        self._lock = threading.Lock()
        self._arms: dict[str, _Arm] = {}
        self._warned = False
        self._finished = False
        self._baselines = self._baseline_strategies()
        key_metric = self._key_metric()
        tags = {"umbel.scenario": run["name"], "umbel.workload": str(run.get("workload", ""))}
        if key_metric:
            tags["umbel.key_metric"] = key_metric
        self.run_id: str = self.client.create_run(self.experiment_id, run_name=run["name"], tags=tags).info.run_id
        self._log(self.run_id, params=flatten_scenario(scenario))

    # -- set-up -----------------------------------------------------------------------
    def _experiment(self, artefacts: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = artefacts.resolve().as_uri() if artefacts is not None else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # made meanwhile by another run
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _key_metric(self) -> str:
        try:
            from workloads import workload_class

            return workload_class(self.scenario["run"]["workload"]).key_metric_for(self.scenario)
        except Exception:  # a tag only: never a reason to fail
            return ""

    def _baseline_strategies(self) -> dict[str, str]:
        """Baseline name -> the strategy it runs (for the arms' ``strategy`` param)."""
        try:
            from simulations.launcher import baseline_runs

            return {name: strategy for name, (_, strategy) in baseline_runs(self.scenario).items()}
        except Exception:
            return {}

    # -- logging ----------------------------------------------------------------------
    def _log(self, run_id: str, params: dict[str, str] | None = None,
             metrics: list[tuple[str, float, int]] | None = None, tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params_ = [Param(k, v) for k, v in (params or {}).items()]
        tags_ = [RunTag(k, v) for k, v in (tags or {}).items()]
        metrics_ = [Metric(k, v, now, step) for k, v, step in metrics or []]
        for i in range(0, max(len(params_), len(tags_)), 100):  # MLflow's batch limits
            self.client.log_batch(run_id, params=params_[i:i + 100], tags=tags_[i:i + 100])
        for i in range(0, len(metrics_), 1000):
            self.client.log_batch(run_id, metrics=metrics_[i:i + 1000])

    def _guarded(self, what: str, fn: Any, *args: Any) -> None:
        """Log without stopping the run on a tracking failure (warned once)."""
        try:
            fn(*args)
        except Exception as err:
            if not self._warned:
                self._warned = True
                log.warning("MLflow tracking (%s) failed, the run goes on untracked: %r", what, err)

    def _new_metrics(self, arm: _Arm, rows: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
        """The metrics of ``rows`` not logged yet (a row's loss comes one round later)."""
        out = []
        for row in rows:
            step = int(row["round"])
            for key, value in row.items():
                if key == "round" or (step, key) in arm.logged:
                    continue
                number = scalar(value)
                if number is not None:
                    arm.logged.add((step, key))
                    out.append((metric_key(key), number, step))
        return out

    def _strategy(self, label: str) -> str:
        head = label.split("/", 1)[0]
        return self._baselines.get(head, head)

    def _open_arm(self, label: str, rows: list[dict[str, Any]]) -> None:
        tags = {"mlflow.parentRunId": self.run_id, "umbel.arm": label}
        if label.split("/", 1)[0] in self._baselines:
            tags["umbel.baseline"] = "true"
        run_id = self.client.create_run(self.experiment_id, run_name=label, tags=tags).info.run_id
        arm = self._arms[label] = _Arm(run_id)
        arm.rows = list(rows)
        self._log(run_id, params={"arm": label, "strategy": self._strategy(label)},
                  metrics=self._new_metrics(arm, arm.rows))

    # -- RunObserver ------------------------------------------------------------------
    def on_strategy_start(self, strategy: str, rounds: int) -> None:
        with self._lock:
            self._guarded("arm start", self._open_arm, strategy, [])

    def on_strategy_resume(self, strategy: str, rounds: int, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._guarded("arm resume", self._open_arm, strategy, rows)

    def on_round(self, strategy: str, row: dict[str, Any]) -> None:
        with self._lock:
            arm = self._arms.get(strategy)
            if arm is None:
                return
            if not arm.rows or arm.rows[-1] is not row:  # row 0 is handed over twice at most
                arm.rows.append(row)
            self._guarded("round", lambda: self._log(arm.run_id, metrics=self._new_metrics(arm, arm.rows[-2:])))

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            arm = self._arms.pop(strategy, None)
            if arm is None:
                return

            def close() -> None:
                self._log(arm.run_id, metrics=self._new_metrics(arm, rows))
                self.client.set_terminated(arm.run_id, "FINISHED")

            self._guarded("arm end", close)

    # -- the end ----------------------------------------------------------------------
    def finish(self, run_dir: Path, status: str) -> None:
        """Attach the run record's report and close the parent run (and any arm left open)
        with the MLflow status of umbel's ``status`` (finished, failed, interrupted)."""
        if status not in STATUS:
            raise ValueError(f"status {status!r}: expected one of {', '.join(STATUS)}")
        mlflow_status = STATUS[status]
        run_dir = Path(run_dir)
        with self._lock:
            if self._finished:
                return
            self._finished = True
            for label, arm in list(self._arms.items()):
                rows = arm.rows
                self._guarded("arm end", lambda: (self._log(arm.run_id, metrics=self._new_metrics(arm, rows)),
                                                  self.client.set_terminated(arm.run_id, mlflow_status)))
            self._arms.clear()

            def close() -> None:
                self._log(self.run_id, tags={"umbel.run_dir": str(run_dir.resolve()), "umbel.status": status,
                                             "mlflow.runName": run_dir.name})
                files = [run_dir / name for name in ARTEFACTS] + sorted(run_dir.glob("*.png"))
                for path in files:
                    if path.is_file():
                        self.client.log_artifact(self.run_id, str(path))
                self.client.set_terminated(self.run_id, mlflow_status)

            self._guarded("finish", close)

    def url(self, base: str) -> str:
        """The parent run's page on an MLflow UI at ``base`` (e.g. ``http://127.0.0.1:5000``)."""
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
