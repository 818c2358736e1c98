"""The in-process reference of every strategy: the round engine over a ``LocalGrid``.

The rounds run through the same code as a Flower run (``server.app.run_strategy``, the real
strategy classes, the real ``ClientApp``), with the cohorts served one after another in this
process instead of by Ray workers. Tests compare Flower runs with it, the statistical tests
and benchmarks use it for speed, and the launcher's centralised baselines run on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Callable

import numpy as np
from client.app import app as client_app
from server.app import client_config, flatten, run_strategy, seed_globals
from server.record import RunObserver
from server.run_config import client_view
from simulations.local_grid import LocalGrid
from strategies import coarse_init_for
from strategies.clustered_fl import ClusteredStrategy
from strategies.coarse_init import CoarseResult
from workloads import workload_class
from workloads.base import CohortData, Params, Workload
from workloads.federation import cohort_slice, num_nodes


@contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's strategies log a line per exchange at INFO; in-process runs keep warnings
    (dropped replies) and drop the rest."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


class RowCollector(RunObserver):
    """Keeps an arm's final models, hands each row to ``on_row`` as it is first written, and
    passes every event on to ``observer`` (e.g. the run record of the launcher's baselines)."""

    def __init__(self, on_row: Callable[[dict[str, Any]], None] | None, observer: RunObserver | None) -> None:
        self.on_row, self.observer, self.models = on_row, observer or RunObserver(), None

    def on_strategy_start(self, strategy: str, rounds: int) -> None:
        self.observer.on_strategy_start(strategy, rounds)

    def on_round(self, strategy: str, row: dict[str, Any]) -> None:
        if self.on_row is not None:
            self.on_row(row)
        self.observer.on_round(strategy, row)

    def on_strategy_end(self, strategy: str, rows: list[dict[str, Any]]) -> None:
        self.observer.on_strategy_end(strategy, rows)

    def on_models(self, strategy: str, models: dict[str, np.ndarray]) -> None:
        self.models = models
        self.observer.on_models(strategy, models)


class Reference:
    """One federation in this process, cut into the scenario's cohorts (one node each)."""

    def __init__(self, scenario: dict[str, Any]) -> None:
        self.scenario = scenario
        self.workload: Workload = workload_class(scenario["run"]["workload"])(client_view(scenario))
        fed = scenario["federation"]
        self.nodes = num_nodes(fed["clients"], fed["cohort_size"])
        self.grid = LocalGrid(client_app, [{"partition-id": p, "num-partitions": self.nodes}
                                           for p in range(self.nodes)])

    @cached_property
    def cohorts(self) -> list[CohortData]:
        """Every cohort's data, as its node generates them (for tests)."""
        clients = self.scenario["federation"]["clients"]
        return [self.workload.client_data(cohort_slice(p, self.nodes, clients)) for p in range(self.nodes)]

    def phase1(self, phase1: str | None = None) -> CoarseResult:
        """Phase 1 of the clustered strategies over the exchange (``phase1`` overrides
        ``clustered.phase1``)."""
        s, wl = self.scenario, self.workload
        base = wl.initial_parameters()
        init = coarse_init_for("clustered-fedavg", wl.num_clusters, sum(v.size for v in base.values()),
                               s["federation"]["seed"], s["clustered"], phase1, start=flatten(base),
                               lr=s["train"]["lr"])
        strategy = ClusteredStrategy(wl.num_clusters, num_nodes=self.nodes, timeout=s["run"]["round_timeout"])
        dropped: list[str] = []
        with quiet_flower():
            coarse = init.estimate(strategy.exchange(self.grid, client_config(s), dropped))
        coarse.warnings.extend(dropped)
        return coarse

    def run(
        self, strategy: str, start: Params | None = None, reply: str | None = None,
        variant: str = "", on_row: Callable[[dict[str, Any]], None] | None = None,
        keep_models: bool = True, observer: RunObserver | None = None, label: str | None = None,
    ) -> list[dict[str, Any]]:
        """The run record's rows of one arm (``variant`` picks one of the workload's variants;
        ``start`` overrides the models handed in, ``reply`` the k-model reply form). With
        ``keep_models``, the last row holds the final models (``models``); ``on_row`` sees
        each row when it is first written (a row's loss is filled in one round later);
        ``observer`` gets the arm's events under ``label`` (default: strategy/variant)."""
        scenario = self.scenario
        if reply is not None:
            scenario = {**scenario, "clustered": {**scenario["clustered"], "reply": reply}}
        collector = RowCollector(on_row, observer)
        seed_globals(scenario["federation"]["seed"])  # as the ServerApp
        with quiet_flower():
            rows = run_strategy(self.grid, strategy, scenario, self.workload, self.nodes, collector,
                                variant=variant, start=start, label=label)
        if keep_models:
            rows[-1]["models"] = collector.models
        return rows


def run_arm(scenario: dict[str, Any], name: str, **kwargs: Any) -> list[dict[str, Any]]:
    """``Reference(scenario).run(name, ...)`` as one function (picklable: for process pools)."""
    return Reference(scenario).run(name, **kwargs)


def flower_against_in_process(scenario: dict[str, Any], strategy: str, variant: str, metric: str) -> dict[str, Any]:
    """Median s/round (rounds after the first) of one arm through Flower's simulation engine
    and through the in-process engine, same federation and seed, and whether both end at the
    same ``metric`` (to 1e-9): the benchmarks' speed line."""
    import tempfile
    from pathlib import Path

    from server.record import load_history
    from simulations.launcher import simulate

    label = f"{strategy}/{variant}" if variant else strategy
    with tempfile.TemporaryDirectory() as tmp:
        flower = load_history(simulate(scenario, out=Path(tmp)))["strategies"][label]
    local = Reference(scenario).run(strategy, variant=variant, keep_models=False)

    def per_round(rows: list[dict[str, Any]]) -> float:
        return float(np.median([r["wall_time_s"] for r in rows if r["round"] >= 2]))

    return {"flower_s_per_round": per_round(flower), "in_process_s_per_round": per_round(local),
            "same_final": abs(flower[-1][metric] - local[-1][metric]) < 1e-9}
