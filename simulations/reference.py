"""The in-process reference of the k-model strategies: the same arithmetic, no Flower.

Cohorts are computed one after another in this process with the client's own functions
(``client.compute``) and aggregated with the strategy's pure core. Tests compare Flower runs
with it, the statistical tests and benchmarks use it for speed, and it is the numpy limit
that the Flower path is measured against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from client.compute import coarse_cohort, evaluate_cohort, train_cohort
from server.app import initial_models
from server.run_config import client_view
from strategies import K_MODEL, coarse_init_for, k_model_roles
from strategies.clustered import aggregate_results, cluster_means
from strategies.clustered_fl import unflatten
from strategies.coarse_init import CoarseResult, reduce_coarse
from strategies.exact_sum import dd_value
from workloads import workload_class
from workloads.base import Params, TrainSettings, Workload
from workloads.federation import cohort_slice, num_nodes


class Reference:
    """One federation in memory, cut into the scenario's cohorts."""

    def __init__(self, scenario: dict[str, Any], workload: Workload | None = None) -> None:
        self.scenario = scenario
        self.workload = workload or workload_class(scenario["run"]["workload"])(client_view(scenario))
        fed = scenario["federation"]
        parts = num_nodes(fed["clients"], fed["cohort_size"])
        self.cohorts = [
            self.workload.client_data(cohort_slice(p, parts, fed["clients"])) for p in range(parts)
        ]

    def exchange(self, step: str, request: Params, reduce: str) -> dict[str, np.ndarray]:
        return reduce_coarse(
            [coarse_cohort(self.workload, c, step, request, reduce) for c in self.cohorts], reduce
        )

    def phase1(self, phase1: str | None = None) -> CoarseResult:
        """Phase 1 of the clustered strategies (``phase1`` overrides ``clustered.phase1``)."""
        wl = self.workload
        dim = sum(v.size for v in wl.initial_parameters().values())
        init = coarse_init_for("clustered-fedavg", wl.num_clusters, dim,
                               self.scenario["federation"]["seed"], self.scenario["clustered"], phase1)
        return init.estimate(self.exchange)

    def run(
        self, strategy: str, start: Params | None = None, reply: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows like the run record's (central metrics per round, misclustering of the
        choices made under each round's models); the models of every row in ``models``."""
        if strategy not in K_MODEL:
            raise ValueError(f"the reference runs k-model strategies {K_MODEL}, not {strategy!r}")
        s, wl = self.scenario, self.workload
        train, fed = s["train"], s["federation"]
        models = start if start is not None else initial_models(wl, s["clustered"]["init"], fed["seed"])
        if strategy.startswith("clustered-"):
            models = unflatten(self.phase1().centres, models)
        selection, proximal_mu = k_model_roles(strategy, train["proximal_mu"])
        settings = TrainSettings(train["local_steps"], train["lr"], proximal_mu)
        reply = reply or s["clustered"]["reply"]
        rows = []
        for rnd in range(1, s["run"]["rounds"] + 1):
            results = [
                train_cohort(wl, c, models, selection=selection, reply=reply,
                             settings=settings, round_=rnd, federation=fed)
                for c in self.cohorts
            ]
            total = aggregate_results(
                [r.batch for r in results if r.batch is not None],
                [r.sums for r in results if r.sums is not None],
                wl.num_clusters,
            )
            confusion = sum(r.confusion for r in results if r.confusion is not None)
            rows.append(self._row(rnd - 1, models, confusion, dd_value(total.loss).sum() / total.examples.sum()))
            rows[-1]["clients"] = int(total.clients.sum())  # clients that trained on these models
            models = cluster_means(total, models)
        final = [evaluate_cohort(wl, c, models, selection) for c in self.cohorts]
        confusion = sum(f[2] for f in final)
        loss = sum(dd_value(f[1]) for f in final) / sum(int(f[0][0]) for f in final)
        rows.append(self._row(len(rows), models, confusion, loss))
        return rows

    def _row(self, rnd: int, models: Params, confusion: np.ndarray, loss: float) -> dict[str, Any]:
        row = {"round": rnd, **self.workload.central_metrics(models, confusion)}
        row[self.workload.loss_name] = float(loss)
        row["models"] = {n: v.copy() for n, v in models.items()}
        return row
