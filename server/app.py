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
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.record import RunObserver, RunRecord, new_run_dir
from server.run_config import client_view, resolve, unflatten
from strategies import build_strategy
from strategies.cohort_reply import params_to_record, record_to_params
from workloads import workload_class
from workloads.base import Workload
from workloads.federation import num_nodes

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


def run_strategy(
    grid: Grid,
    name: str,
    scenario: dict[str, Any],
    workload: Workload,
    nodes: int,
    observer: RunObserver,
) -> list[dict[str, Any]]:
    """Run one strategy for ``run.rounds`` rounds; returns its per-round rows.

    Row r holds the central metrics of the model after round r (row 0: the initial model),
    its mean local loss, the clients aggregated, dropped replies and the round's wall time.
    """
    run, train = scenario["run"], scenario["train"]
    loss_key = workload.loss_name
    strategy = build_strategy(name, nodes, proximal_mu=train["proximal_mu"])
    config = ConfigRecord(
        {
            "scenario": json.dumps(client_view(scenario), sort_keys=True),
            "local-steps": train["local_steps"],
            "lr": train["lr"],
        }
    )
    arrays = params_to_record(workload.initial_parameters())
    observer.on_strategy_start(name, run["rounds"])
    rows: list[dict[str, Any]] = []

    def central(arrays_: Any) -> dict[str, Any]:
        return workload.central_metrics([record_to_params(arrays_)])

    row: dict[str, Any] = {"round": 0, **central(arrays)}
    rows.append(row)
    observer.on_round(name, row)
    for rnd in range(1, run["rounds"] + 1):
        start = time.perf_counter()
        messages = strategy.configure_train(rnd, arrays, config, grid)
        replies = grid.send_and_receive(messages, timeout=run["round_timeout"])
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        report = strategy.last_report
        wall = time.perf_counter() - start
        # The replies scored the previous model on every client's data.
        rows[-1][loss_key] = report.metrics.get("loss-before")
        if new_arrays is not None:
            arrays = new_arrays
        row = {"round": rnd, **central(arrays), "clients": report.clients}
        row["dropped"] = len(report.dropped)
        if report.dropped:
            row["dropped_replies"] = report.dropped
        row["wall_time_s"] = wall
        rows.append(row)
        observer.on_round(name, row)
    # One evaluate exchange scores the final model.
    replies = grid.send_and_receive(
        strategy.configure_evaluate(run["rounds"], arrays, ConfigRecord(dict(config)), grid),
        timeout=run["round_timeout"],
    )
    strategy.aggregate_evaluate(run["rounds"], replies)
    rows[-1][loss_key] = strategy.last_report.metrics.get("loss")
    observer.on_strategy_end(name, rows)
    return rows


def run_federation(grid: Grid, scenario: dict[str, Any], observer: RunObserver) -> None:
    """Every strategy of the scenario, in order, on the same federation and seed."""
    workload = workload_class(scenario["run"]["workload"])(client_view(scenario))
    fed = scenario["federation"]
    nodes = num_nodes(fed["clients"], fed["cohort_size"])
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = PULL_INTERVAL_S
    wait_for_nodes(grid, nodes)
    for name in scenario["run"]["strategies"]:
        random.seed(fed["seed"])  # Flower samples nodes with the global `random`
        run_strategy(grid, name, scenario, workload, nodes, observer)


def make_server_app(scenario: dict[str, Any], observer: RunObserver) -> ServerApp:
    """A ServerApp bound to a resolved scenario (used by the simulation launcher)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, scenario, observer)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the scenario comes from the run config."""
    scenario = resolve(unflatten(dict(context.run_config)), source="run config")
    key_metric = workload_class(scenario["run"]["workload"]).key_metric
    run_dir = new_run_dir(scenario["run"]["out"], scenario["run"]["name"])
    record = RunRecord(run_dir, scenario, key_metric)
    log(logging.INFO, "umbel: run record in %s", run_dir)
    try:
        run_federation(grid, scenario, record)
    except BaseException as err:
        record.finish("failed", repr(err))
        raise
    record.finish("finished")
