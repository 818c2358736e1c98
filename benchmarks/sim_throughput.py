"""Client-rounds per second through Flower's simulation engine against the numpy limit.

For each federation size, the same FedAvg round (every client scores the model it receives,
then takes ``local_steps`` gradient steps; the server averages) is timed
- through Flower: ``umbel``'s launcher on the Ray backend, steady rounds after start-up
  (the round's wall time as the server measures it: send, client work, replies, aggregation);
- through the in-process reference: the same round engine, strategy and ClientApp over a
  ``LocalGrid`` (messages, encoding and decoding, no transport), the same wall time;
- in one process: the workload's vectorised kernels over the whole federation as a single
  cohort plus the same aggregation, one thread (the limit Flower's path is measured against;
  deliberately no platform code at all).

Usage: python benchmarks/sim_throughput.py [--rounds 10] [--out benchmarks/results]
Prints a table and writes ``sim_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from server.record import load_history  # noqa: E402
from server.run_config import client_view  # noqa: E402
from simulations.launcher import simulate  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from proto.wire import ClientBatch  # noqa: E402
from strategies.aggregation import weighted_average  # noqa: E402
from workloads.base import TrainSettings, stack_params  # noqa: E402
from workloads.mixed_regression import MixedRegression  # noqa: E402

# (clients, cohort_size): cohorts sized so the two Ray actors each get whole cohorts, and
# the device-like case of one client per node.
CASES = [(100, 50), (1_000, 250), (10_000, 2_500), (100, 1)]


def scenario_for(clients: int, cohort: int, rounds: int) -> dict:
    return load_scenario(
        "default",
        [f"federation.clients={clients}", f"federation.cohort_size={cohort}",
         f"run.rounds={rounds}", "run.strategies=['fedavg']", f"run.name='bench-{clients}-{cohort}'"],
    )


def numpy_limit(scenario: dict, rounds: int) -> float:
    """Seconds per round of the same computation in one process (data generation excluded)."""
    wl = MixedRegression(client_view(scenario))
    data = wl.client_data(np.arange(wl.num_clients))
    _ = data.lambda_max  # cached per cohort in the Flower path too
    settings = TrainSettings(local_steps=scenario["train"]["local_steps"], lr=scenario["train"]["lr"])
    w = wl.initial_parameters()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        loss = wl.local_loss(w, data) * data.num_examples
        trained = wl.local_train(stack_params(w, len(data.client_ids)), data, settings)
        w = weighted_average(ClientBatch(data.client_ids, data.num_examples, trained,
                                         {"loss-before": loss}))
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def reference_round(scenario: dict) -> float:
    """Steady seconds per round of the in-process reference (the round engine over a LocalGrid)."""
    rows = Reference(scenario).run("fedavg", keep_models=False)
    return statistics.median([r["wall_time_s"] for r in rows if r["round"] >= 2])


def flower_round(scenario: dict, out: Path) -> tuple[float, float]:
    """(steady seconds per round, start-up seconds) through Flower."""
    t = time.perf_counter()
    run_dir = simulate(scenario, out=out)
    total = time.perf_counter() - t
    rows = load_history(run_dir)["strategies"]["fedavg"]
    walls = [r["wall_time_s"] for r in rows if r["round"] >= 1]
    return statistics.median(walls[1:]), total - sum(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for clients, cohort in CASES:
        scenario = scenario_for(clients, cohort, args.rounds)
        limit = numpy_limit(scenario, args.rounds)
        reference = reference_round(scenario)
        flower, startup = flower_round(scenario, args.out / "runs")
        row = {
            "clients": clients,
            "cohort_size": cohort,
            "nodes": -(-clients // cohort),
            "flower_s_per_round": flower,
            "numpy_s_per_round": limit,
            "reference_s_per_round": reference,
            "flower_client_rounds_per_s": clients / flower,
            "numpy_client_rounds_per_s": clients / limit,
            "ratio": limit / flower,
            "startup_s": startup,
        }
        results.append(row)
        print(json.dumps(row))
    (args.out / "sim_throughput.json").write_text(json.dumps(results, indent=1))
    print()
    print("| clients | cohort | nodes | Flower client-rounds/s | numpy limit | ratio | Flower s/round | "
          "reference s/round | numpy s/round | start-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['clients']:,} | {r['cohort_size']} | {r['nodes']} | "
              f"{r['flower_client_rounds_per_s']:,.0f} | {r['numpy_client_rounds_per_s']:,.0f} | "
              f"{r['ratio']:.2g} | {r['flower_s_per_round']:.3f} | {r['reference_s_per_round']:.4f} | "
              f"{r['numpy_s_per_round']:.4f} | {r['startup_s']:.1f} |")


if __name__ == "__main__":
    main()
