"""The in-process reference of every strategy: the same arithmetic, no Flower.

Cohorts are computed one after another in this process with the client's own functions
(``client.compute``) and aggregated with the strategy's pure core. Tests compare Flower runs
with it, the statistical tests and benchmarks use it for speed, and it is the numpy limit
that the Flower path is measured against.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np

from client.compute import begin_round, coarse_cohort, evaluate_cohort, train_cohort
from server.app import flatten, initial_models, round_counts, scored_metrics
from server.run_config import client_view, round_lr
from strategies import SINGLE_MODEL, STRATEGIES, coarse_init_for, k_model_roles
from strategies.aggregation import merge_batches, metric_means, weighted_average
from strategies.clustered import aggregate_results, cluster_means
from strategies.clustered_fl import unflatten
from strategies.coarse_init import CoarseResult, reduce_coarse
from strategies.exact_sum import dd_value
from workloads import workload_class
from workloads.base import Params, TrainSettings, Workload
from workloads.federation import OUTCOMES, cohort_slice, num_nodes


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
        # As after a message: contiguous copies (a strided basis would send BLAS down another
        # path and change last bits against the Flower run).
        request = {name: np.ascontiguousarray(v) for name, v in request.items()}
        return reduce_coarse(
            [coarse_cohort(self.workload, c, step, request, reduce) for c in self.cohorts], reduce
        )

    def phase1(self, phase1: str | None = None) -> CoarseResult:
        """Phase 1 of the clustered strategies (``phase1`` overrides ``clustered.phase1``)."""
        wl = self.workload
        dim = sum(v.size for v in wl.initial_parameters().values())
        init = coarse_init_for("clustered-fedavg", wl.num_clusters, dim,
                               self.scenario["federation"]["seed"], self.scenario["clustered"], phase1,
                               start=flatten(wl.initial_parameters()), lr=self.scenario["train"]["lr"])
        return init.estimate(self.exchange)

    def run(
        self, strategy: str, start: Params | None = None, reply: str | None = None,
        variant: str = "", on_row: Callable[[dict[str, Any]], None] | None = None,
        keep_models: bool = True,
    ) -> list[dict[str, Any]]:
        """Rows like the run record's: row r describes the models after round r (row 0: the
        models of round 1) with the workload's central metrics, the mean local loss and
        misclustering of the choices made under them, and, for r >= 1, the clients and
        examples that trained them plus the workload's own per-round counts. The models of
        every row are in ``models`` (unless ``keep_models`` is off). ``variant`` picks one of the
        workload's variants; ``on_row`` sees each row when it is first written (as the run
        record does: a row's loss is filled in one round later)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
        s, wl = self.scenario, self.workload
        train, fed = s["train"], s["federation"]
        single = strategy in SINGLE_MODEL
        if single:
            selection, reply = "single", "clients"
            proximal_mu = train["proximal_mu"] if strategy == "fedprox" else 0.0
            models = {n: v[None] for n, v in (start or wl.initial_parameters()).items()}
        else:
            models = start if start is not None else initial_models(wl, s["clustered"]["init"], fed["seed"])
            if strategy.startswith("clustered-"):
                models = unflatten(self.phase1().centres, models)
            selection, proximal_mu = k_model_roles(strategy, train["proximal_mu"])
            reply = reply or s["clustered"]["reply"]
        settings = TrainSettings(train["local_steps"], train["lr"], proximal_mu)
        states: list[Params | None] = [None] * len(self.cohorts)
        def row_for(rnd: int, models: Params) -> dict[str, Any]:
            row = {"round": rnd, **wl.central_metrics(models)}
            if keep_models:
                row["models"] = {n: v.copy() for n, v in models.items()}
            return row

        rows = [row_for(0, models)]
        for rnd in range(1, s["run"]["rounds"] + 1):
            results = []
            for p, cohort in enumerate(self.cohorts):
                data, states[p], extra = begin_round(
                    wl, cohort, models, states[p], round_=rnd, variant=variant, federation=fed)
                results.append(train_cohort(
                    wl, data, models, selection=selection, reply=reply,
                    settings=replace(settings, lr=round_lr(train, rnd, s["run"]["rounds"])),
                    round_=rnd, federation=fed, extra_metrics=extra))
            if single:
                batch = merge_batches([r.batch for r in results if r.batch is not None])
                means = metric_means(batch)
                rows[-1][wl.loss_name] = means.pop("loss-before")
                models = {n: v[None] for n, v in weighted_average(batch).items()}
                row = row_for(rnd, models)
                row.update(clients=len(batch), examples=int(batch.num_examples.sum()))
                row.update(round_counts(means, row["examples"]))
            else:
                total = aggregate_results(
                    [r.batch for r in results if r.batch is not None],
                    [r.sums for r in results if r.sums is not None],
                    wl.num_clusters,
                )
                confusion = sum(r.confusion for r in results if r.confusion is not None)
                loss = float(dd_value(total.loss).sum() / total.examples.sum())
                rows[-1].update(scored_metrics(wl, models, confusion, loss))
                models = cluster_means(total, models)
                row = row_for(rnd, models)
                row.update(clients=int(total.clients.sum()), examples=int(total.examples.sum()))
            row.update(zip(OUTCOMES, sum(r.outcomes for r in results).tolist()))
            rows.append(row)
            if on_row is not None:
                if rnd == 1:
                    on_row(rows[0])
                on_row(row)
        data = [wl.with_state(c, st) if st is not None else c for c, st in zip(self.cohorts, states)]
        final = [evaluate_cohort(wl, d, models, selection) for d in data]
        confusion = None if final[0][2] is None else sum(f[2] for f in final)
        loss = sum(dd_value(f[1]) for f in final) / sum(int(f[0][0]) for f in final)
        rows[-1].update(scored_metrics(wl, models, confusion, float(loss)))
        final_report = wl.final_report(models)
        if final_report:
            rows[-1]["final"] = final_report
        return rows


def run_arm(scenario: dict[str, Any], name: str, **kwargs: Any) -> list[dict[str, Any]]:
    """``Reference(scenario).run(name, ...)`` as one function (picklable: for process pools)."""
    return Reference(scenario).run(name, **kwargs)
