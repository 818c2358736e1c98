"""Clustered mixed regression against IFCA and the oracle, over seeds and two instances.

On the default instance (d=20, k=4, 1000 Zipf(1.6)-sized clients, 8 anchors of 65 points) and
on the same with 90% of the clients holding one point, for every seed and method: the final
estimation error relative to the label oracle (per-cluster least squares with the true
labels), the rounds until it first falls under 1.1x, the reply bytes until then and per
round (``reply_bytes``: the arrays of the cohorts' replies; Phase 1's exchange excluded),
misclustering per client-size bucket against the Bayes rate, and whether the clustered
strategies end the same from any handed-in start (zeros, all models equal to one true model,
random: Phase 1 replaces them). Two label-free bounds sit beside the oracle: the hard
alternation started at the true models, and the maximum-likelihood fit by EM (soft
assignments, noise and mixing weights estimated, started at the true models): no estimator
without labels is expected to beat the second, so its gap to the label oracle is what the
missing labels cost on that instance. Statistics come from the in-process reference (the same
arithmetic as the Flower path, which the tests check); seconds per round come from one run
of the default scenario through Flower.

Usage: python benchmarks/mixed_regression.py [--seeds 10] [--first-seed 0] [--bounds-only]
       [--out benchmarks/results]
(``--bounds-only``: only the default arm (second order), the truth-started alternation, maximum
likelihood and the oracle: the label-free bounds over many seeds.)
Writes ``mixed_regression.json`` and ``mixed_regression.png``; prints Markdown tables.
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
from workloads.mixed_regression import best_matching  # noqa: E402

BAR = 1.25
RANDOM_STARTS = 3  # random initial models per seed for IFCA (the clustered strategies ignore them)
IFCA_RANDOM = f"ifca (random start, {RANDOM_STARTS} per seed)"
INSTANCES = {"default": [], "90% one-point": ["federation.single_point_fraction=0.9"]}
OLD_DEFAULT = ["train.lr=0.02", "train.step_cap=0.5", "run.rounds=150"]  # the default before issue 17


MAXIMUM_LIKELIHOOD = "maximum likelihood (EM from the truth, labels unknown)"
SOFT = "second order, soft assignments (clustered-soft)"


def methods(ref: Reference, seed: int, bounds_only: bool = False):
    """(label, strategy, handed-in start, scenario overrides or None)."""
    wl = ref.workload
    if bounds_only:
        yield "second order (clustered)", "clustered-second-order", None, None
        yield SOFT, "clustered-soft", None, None
        yield "alternation from the truth", "ifca", wl.true_parameters(), None
        yield "oracle (true labels, FedAvg)", "oracle", None, None
        return
    yield "second order (clustered)", "clustered-second-order", None, None
    yield SOFT, "clustered-soft", None, None
    yield "first order (clustered-fedavg, lr 0.4, no cap)", "clustered-fedavg", None, None
    yield "clustered-fedprox (mu 10)", "clustered-fedprox", None, None
    yield "first order, old default (lr 0.02, step cap 0.5; 150 rounds)", "clustered-fedavg", None, OLD_DEFAULT
    for r in range(RANDOM_STARTS):
        yield IFCA_RANDOM, "ifca", initial_models(wl, "random", 1000 * seed + r), None
    yield "ifca (all equal to one true model)", "ifca", initial_models(wl, "true-first", seed), None
    yield "ifca (zeros)", "ifca", initial_models(wl, "zeros", seed), None
    yield "alternation from the truth", "ifca", wl.true_parameters(), None
    yield "oracle (true labels, FedAvg)", "oracle", None, None


def start_invariant(ref: Reference, strategy: str, seed: int) -> bool:
    """Whether a clustered strategy ends at the same models from every handed-in start."""
    wl = ref.workload
    finals = [ref.run(strategy, start=start)[-1]["models"]["w"] for start in (
        initial_models(wl, "zeros", seed), initial_models(wl, "true-first", seed), initial_models(wl, "random", seed))]
    return all(np.array_equal(finals[0], f) for f in finals[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--bounds-only", action="store_true",
                        help="only second order, the label-free bounds and the oracle (for many seeds)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower timing run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in INSTANCES}
    invariant: dict[str, list[bool]] = {}
    t0 = time.perf_counter()
    for instance, extra in INSTANCES.items():
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            refs = {None: Reference(load_scenario("default", extra, seed=seed))}
            ref = refs[None]
            oracle = ref.workload.oracle()
            for label, strategy, start, overrides in methods(ref, seed, args.bounds_only):
                key = tuple(overrides) if overrides else None
                if key not in refs:
                    refs[key] = Reference(load_scenario("default", [*extra, *overrides], seed=seed))
                rows = refs[key].run(strategy, start=start)
                ratios = [r["estimation_error"] / oracle["error"] for r in rows]
                reach = next((i for i, x in enumerate(ratios) if x <= 1.1), None)
                sent = np.cumsum([0] + [r.get("reply_bytes", 0) for r in rows[1:]])
                runs[instance].setdefault(label, []).append({
                    "seed": seed, "final_ratio": ratios[-1], "rounds_to_1.1": reach,
                    "bytes_to_1.1": None if reach is None else int(sent[reach]),
                    "bytes_per_round": float(np.median([r.get("reply_bytes", 0) for r in rows[1:]])),
                    "curve": ratios,
                    "misclustering": {b: rows[-1].get(f"misclustering_{b}") for b in SIZE_BUCKETS},
                    "bayes": oracle["bayes_misclustering"],
                })
            ml_error = best_matching(ref.workload.maximum_likelihood(), ref.workload.true_models)[0]
            runs[instance].setdefault(MAXIMUM_LIKELIHOOD, []).append({
                "seed": seed, "final_ratio": ml_error / oracle["error"], "rounds_to_1.1": None,
                "bytes_to_1.1": None, "bytes_per_round": 0.0, "curve": [ml_error / oracle["error"]],
                "misclustering": {b: None for b in SIZE_BUCKETS}, "bayes": oracle["bayes_misclustering"]})
            for strategy in ("clustered-second-order", "clustered-soft", "clustered-fedavg") if not args.bounds_only else ():
                invariant.setdefault(f"{instance}: {strategy}", []).append(start_invariant(ref, strategy, seed))
            print(f"{instance} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    seconds = {}
    if not (args.no_flower or args.bounds_only):
        t = time.perf_counter()
        run_dir = simulate(load_scenario("default"), out=args.out / "runs")
        seconds["make run"] = time.perf_counter() - t
        for name, rows in load_history(run_dir)["strategies"].items():
            seconds[name] = float(np.median([r["wall_time_s"] for r in rows if r["round"] >= 2]))

    tables = {instance: summarise(by_label) for instance, by_label in runs.items()}
    bayes = {i: {b: float(np.nanmean([np.nan if r["bayes"][b] is None else r["bayes"][b]
                                      for rs in by.values() for r in rs])) for b in SIZE_BUCKETS}
             for i, by in runs.items()}
    result = {"seeds": args.seeds, "bar": BAR, "methods": tables, "start_invariant": invariant,
              "bayes_misclustering": bayes, "flower_seconds_per_round": seconds,
              "curves": {i: {k: [r["curve"] for r in v] for k, v in by.items()} for i, by in runs.items()}}
    (args.out / "mixed_regression.json").write_text(json.dumps(result, indent=1))
    plot(runs, args)
    flower_name = {"second order (clustered)": "clustered-second-order", SOFT: "clustered-soft",
                   "first order (clustered-fedavg, lr 0.4, no cap)": "clustered-fedavg",
                   "clustered-fedprox (mu 10)": "clustered-fedprox", IFCA_RANDOM: "ifca",
                   "oracle (true labels, FedAvg)": "oracle"}
    for instance, table in tables.items():
        print(f"\n### {instance} ({args.seeds} seeds)\n")
        print("| method | runs | final ÷ oracle (median / max, seeds above 1.1x) | rounds to 1.1x (median / worst, reached) "
              "| reply MB to 1.1x (median) | reply kB per round | misclustering n=1 / n=2 / 3-10 / >10 "
              "| Flower s/round |")
        print("|---|---|---|---|---|---|---|---|")
        for row in table:
            m = row["misclustering"]
            mis = " / ".join("–" if np.isnan(m[b]) else f"{m[b]:.3f}" for b in SIZE_BUCKETS)
            worst = "–" if row["rounds_to_1.1_worst"] is None else f"{row['rounds_to_1.1_worst']}"
            reach = ("–" if row["rounds_to_1.1_median"] is None else
                     f"{row['rounds_to_1.1_median']:.0f} / {worst} ({row['reached_1.1']}/{row['runs']})")
            mb = "–" if row["bytes_to_1.1_median"] is None else f"{row['bytes_to_1.1_median'] / 1e6:.2f}"
            sec = seconds.get(flower_name.get(row["method"], ""), None) if instance == "default" else None
            print(f"| {row['method']} | {row['runs']} | {row['final_ratio_median']:.3f} / {row['final_ratio_max']:.3f}, "
                  f"{row['above_1.1']} "
                  f"| {reach} | {mb} | {row['bytes_per_round'] / 1e3:.0f} | {mis} | {'–' if sec is None else f'{sec:.3f}'} |")
        print(f"| Bayes rate (argmin at the true models) | | | | | | "
              f"{' / '.join(f'{bayes[instance][b]:.3f}' for b in SIZE_BUCKETS)} | |")
    print("\nsame final models from zeros, one true model and random starts:",
          {k: f"{sum(v)}/{len(v)}" for k, v in invariant.items()})
    if seconds:
        print(f"make run (the default scenario through Flower): {seconds['make run']:.0f} s")


def summarise(by_label: dict[str, list[dict]]) -> list[dict]:
    table = []
    for label, rs in by_label.items():
        final = np.array([r["final_ratio"] for r in rs])
        reach = [r["rounds_to_1.1"] for r in rs if r["rounds_to_1.1"] is not None]
        sent = [r["bytes_to_1.1"] for r in rs if r["bytes_to_1.1"] is not None]
        mis = {b: float(np.mean(v)) if (v := [r["misclustering"][b] for r in rs
                                              if r["misclustering"][b] is not None]) else np.nan
               for b in SIZE_BUCKETS}
        table.append({
            "method": label, "runs": len(rs),
            "final_ratio_median": float(np.median(final)), "final_ratio_max": float(final.max()),
            "success_rate": float(np.mean(final <= BAR)),
            "above_1.1": int(np.sum(final > 1.1)),
            "rounds_to_1.1_median": float(np.median(reach)) if reach else None,
            "rounds_to_1.1_worst": max(reach) if len(reach) == len(rs) else None,
            "reached_1.1": len(reach),
            "bytes_to_1.1_median": float(np.median(sent)) if sent else None,
            "bytes_per_round": float(np.median([r["bytes_per_round"] for r in rs])),
            "misclustering": mis,
        })
    return table


def plot(runs: dict[str, dict[str, list[dict]]], args) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    for ax, (instance, by_label) in zip(axes[0], runs.items()):
        for label, rs in by_label.items():
            if len(rs[0]["curve"]) == 1:
                continue  # a final value only (maximum likelihood): in the tables
            curves = np.array([r["curve"][:61] for r in rs])
            med = np.median(curves, axis=0)
            ax.plot(med, label=label)
            ax.fill_between(range(len(med)), curves.min(0), curves.max(0), alpha=0.12)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.1, color="k", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("estimation error / label oracle")
        ax.set_ylim(0.8, None)  # the truth-started run begins at zero error
        ax.set_title(f"{instance}, {args.seeds} seeds (median, min-max band)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "mixed_regression.png", dpi=110)


if __name__ == "__main__":
    main()
