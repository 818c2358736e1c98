"""umbel from Python: run a scenario, with your own strategy objects, and get its record back.

    from umbel import simulate
    run = simulate("default", strategies={"mine": MyRule()}, overrides=["run.rounds=30"])
    run.table()                    # the final table (markdown), as `umbel run` prints it
    run.rows("mine")[-1]           # the last history row of an arm
    run.models("clustered-fedavg") # an arm's final models

``strategies`` maps labels to Flower ``Strategy`` objects (or factories returning one); each
runs on the scenario's federation beside the scenario's own strategies, on the same
cohorts, seed and rounds. The run is written to disk as every run is (``run.dir``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory, and its record as Python objects."""

    dir: Path
    scenario: dict[str, Any]
    history: dict[str, Any]

    @property
    def arms(self) -> list[str]:
        return list(self.history["strategies"])

    def rows(self, arm: str) -> list[dict[str, Any]]:
        return self.history["strategies"][arm]

    def final(self, metric: str | None = None) -> dict[str, Any]:
        """Each arm's final value of ``metric`` (default: the workload's key metric)."""
        metric = metric or self.history["key_metric"]
        return {arm: rows[-1].get(metric) for arm, rows in self.history["strategies"].items()}

    def models(self, arm: str) -> dict[str, np.ndarray]:
        from server.record import load_models

        return load_models(self.dir, arm)

    def table(self) -> str:
        return (self.dir / "summary.md").read_text()


def simulate(
    scenario: str | Path | dict[str, Any] = "default",
    *,
    strategies: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    ray_address: str | None = None,
    quiet: bool = True,
) -> RunResult:
    """Run a scenario (a built-in name, a TOML file, or a dict of sections) on Flower's
    simulation engine; ``strategies`` adds your strategy objects under their labels.
    Raises ``ScenarioError`` (bad input, naming the field), ``LaunchError``, ``RunFailed``."""
    from server.record import load_history
    from server.run_config import resolve
    from simulations.launcher import simulate as launch
    from simulations.scenarios import apply_override, load_scenario
    from strategies import catalog

    objects = dict(strategies or {})
    with catalog.live_strategies(objects):
        if isinstance(scenario, dict):
            raw = copy.deepcopy(scenario)
            for item in overrides or []:
                apply_override(raw, item, "overrides")
            if seed is not None:
                raw.setdefault("federation", {})["seed"] = seed
            resolved = resolve(_with_live(raw, objects), source="<dict>")
        else:  # a resolved scenario resolves again to itself, with the objects' labels added
            base = load_scenario(str(scenario), list(overrides or []), seed)
            resolved = resolve(_with_live(base, objects), source=str(scenario))
        run_dir = launch(resolved, out=out, ray_address=ray_address, verbose=not quiet)
    return RunResult(dir=run_dir, scenario=resolved, history=load_history(run_dir))


def _with_live(raw: dict[str, Any], objects: dict[str, Any]) -> dict[str, Any]:
    """The scenario with the handed-in objects' labels appended to ``run.strategies``, each
    with a table ``use = "python"`` (so the record names where its strategy came from)."""
    if not objects:
        return raw
    from strategies.catalog import LIVE

    raw = copy.deepcopy(raw)
    run = raw.setdefault("run", {})
    run["strategies"] = [*[s for s in run.get("strategies", []) if s not in objects], *objects]
    tables = raw.setdefault("strategy", {})
    for label in objects:
        tables[label] = {"use": LIVE}
    return raw
