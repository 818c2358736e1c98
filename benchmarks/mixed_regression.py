"""Clustered mixed regression against IFCA and the oracle, over seeds.

On the default instance (d=20, k=4, 1000 Zipf(1.6)-sized clients, 8 anchors of 65 points),
for every seed and method: the final estimation error relative to the label oracle (per-
cluster least squares with the true labels), the rounds until it first falls under 1.1x,
misclustering per client-size bucket against the Bayes rate (argmin rule at the true models),
and the success rate (final <= 1.25x oracle) from random starts. Statistics come from the
in-process reference (the same arithmetic as the Flower path, which the tests check);
seconds per round come from one run of the default scenario through Flower.

Usage: python benchmarks/mixed_regression.py [--seeds 10] [--out benchmarks/results]
Writes ``mixed_regression.json`` and ``mixed_regression.png``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from server.app import initial_models  # noqa: E402
from server.record import load_history  # noqa: E402
from simulations.launcher import simulate  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.base import SIZE_BUCKETS  # noqa: E402

BAR = 1.25
RANDOM_STARTS = 3  # random initial models per seed (the clustered strategies ignore them)


def methods(ref: Reference, seed: int):
    wl = ref.workload
    yield "clustered-fedavg", "clustered-fedavg", None
    yield "clustered-fedprox", "clustered-fedprox", None
    for r in range(RANDOM_STARTS):
        yield "ifca (random start)", "ifca", initial_models(wl, "random", 1000 * seed + r)
    yield "ifca (all equal to one true model)", "ifca", initial_models(wl, "true-first", seed)
    yield "alternation from the truth", "ifca", wl.true_parameters()
    yield "oracle (true labels, FedAvg)", "oracle", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower timing run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        ref = Reference(load_scenario("default", seed=seed))
        oracle = ref.workload.oracle()
        phase1 = ref.workload.central_metrics({"w": ref.phase1().centres})["estimation_error"]
        for label, strategy, start in methods(ref, seed):
            rows = ref.run(strategy, start=start)
            ratios = [r["estimation_error"] / oracle["error"] for r in rows]
            runs.setdefault(label, []).append({
                "seed": seed,
                "final_ratio": ratios[-1],
                "rounds_to_1.1": next((i for i, x in enumerate(ratios) if x <= 1.1), None),
                "curve": ratios,
                "misclustering": {b: rows[-1].get(f"misclustering_{b}") for b in SIZE_BUCKETS},
                "bayes": oracle["bayes_misclustering"],
                "phase1_error": phase1 if strategy.startswith("clustered") else None,
            })
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    seconds = {}
    if not args.no_flower:
        run_dir = simulate(load_scenario("default"), out=args.out / "runs")
        for name, rows in load_history(run_dir)["strategies"].items():
            seconds[name] = float(np.median([r["wall_time_s"] for r in rows if r["round"] >= 2]))

    table = []
    for label, rs in runs.items():
        final = np.array([r["final_ratio"] for r in rs])
        reach = [r["rounds_to_1.1"] for r in rs if r["rounds_to_1.1"] is not None]
        mis = {b: np.nanmean([np.nan if r["misclustering"][b] is None else r["misclustering"][b] for r in rs])
               for b in SIZE_BUCKETS}
        table.append({
            "method": label,
            "runs": len(rs),
            "final_ratio_median": float(np.median(final)),
            "final_ratio_max": float(final.max()),
            "success_rate": float(np.mean(final <= BAR)),
            "rounds_to_1.1_median": float(np.median(reach)) if reach else None,
            "reached_1.1": len(reach),
            "misclustering": mis,
            "phase1_error_max": max((r["phase1_error"] or 0.0) for r in rs) or None,
        })
    bayes = {b: float(np.nanmean([np.nan if r["bayes"][b] is None else r["bayes"][b]
                                  for rs in runs.values() for r in rs])) for b in SIZE_BUCKETS}
    result = {"seeds": args.seeds, "bar": BAR, "methods": table, "bayes_misclustering": bayes,
              "flower_seconds_per_round": seconds,
              "curves": {k: [r["curve"] for r in v] for k, v in runs.items()}}
    (args.out / "mixed_regression.json").write_text(json.dumps(result, indent=1))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rs in runs.items():
        curves = np.array([r["curve"] for r in rs])
        med = np.median(curves, axis=0)
        ax.plot(med, label=label)
        ax.fill_between(range(len(med)), curves.min(0), curves.max(0), alpha=0.12)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(BAR, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("estimation error / label oracle")
    ax.set_ylim(0.8, None)  # the truth-started run begins at zero error
    ax.set_title(f"default instance, {args.seeds} seeds (median, min-max band)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "mixed_regression.png", dpi=110)

    print()
    print("| method | runs | final ÷ oracle (median / max) | success (<= 1.25x) | rounds to 1.1x (median, reached) "
          "| misclustering n=1 / n=2 / 3-10 / >10 | Flower s/round |")
    print("|---|---|---|---|---|---|---|")
    flower_name = {"clustered-fedavg": "clustered-fedavg", "clustered-fedprox": "clustered-fedprox",
                   "ifca (random start)": "ifca", "oracle (true labels, FedAvg)": "oracle"}
    for row in table:
        m = row["misclustering"]
        mis = " / ".join("–" if np.isnan(m[b]) else f"{m[b]:.3f}" for b in SIZE_BUCKETS)
        reach = ("–" if row["rounds_to_1.1_median"] is None
                 else f"{row['rounds_to_1.1_median']:.0f} ({row['reached_1.1']}/{row['runs']})")
        sec = seconds.get(flower_name.get(row["method"], ""), None)
        print(f"| {row['method']} | {row['runs']} | {row['final_ratio_median']:.3f} / {row['final_ratio_max']:.3f} "
              f"| {row['success_rate']:.0%} | {reach} | {mis} | {'–' if sec is None else f'{sec:.3f}'} |")
    print(f"| Bayes rate (argmin at the true models) | | | | | "
          f"{' / '.join(f'{bayes[b]:.3f}' for b in SIZE_BUCKETS)} | |")
    if "fedavg" in seconds:
        print(f"\nFedAvg (one model) s/round through Flower: {seconds['fedavg']:.3f}")


if __name__ == "__main__":
    main()
