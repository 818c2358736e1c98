"""Active learning on digits: every selection rule, federated and centralised, over seeds.

For each seed, mode (federated: the ``active-learning`` scenario, 10 clients with a
Dirichlet(0.5) label skew; centralised: one client holding the whole pool) and selection
rule: test accuracy at every label budget (the end of each query cycle), the final accuracy
at 240 labels, and the paired gain over ``random`` on the same seed (same split, same seed
set, same initial model). Runs use the in-process reference (the same arithmetic as the
Flower path, which the tests check) on two worker processes. Then the scorer: per-sample
gradient norms batched with ``torch.func`` against the official one-at-a-time loop, and one
timed run of the built-in scenario through Flower (all rules, both modes).

Usage: python benchmarks/active_learning.py [--seeds 5] [--no-flower] [--out benchmarks/results]
Writes ``active_learning.json`` and ``active_learning.png``; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from simulations.reference import Reference  # noqa: E402
from simulations.report import curve_points  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.active_learning.data import digits  # noqa: E402
from workloads.active_learning.model import DigitsCNN  # noqa: E402
from workloads.active_learning.scoring import (  # noqa: E402
    RULES,
    egl_scores,
    entropy_loss,
    gradnorm_scores,
    gradnorm_scores_loop,
)

MODES = {"federated": [], "centralised": ["federation.clients=1", "federation.cohort_size=1"]}


def one_run(job: tuple[str, str, int]) -> dict:
    mode, rule, seed = job
    torch.set_num_threads(1)
    scenario = load_scenario("active-learning", MODES[mode], seed=seed)
    start = time.perf_counter()
    rows = Reference(scenario).run("fedavg", variant=rule, keep_models=False)
    pts = curve_points(rows, "accuracy")
    return {"mode": mode, "rule": rule, "seed": seed, "labels": [p[0] for p in pts],
            "accuracy": [p[1] for p in pts], "seconds": time.perf_counter() - start}


def scorer_speed(pool: int = 1297, repeats: int = 3) -> dict:
    """Seconds to score ``pool`` digits: batched (vmap over grad) vs the per-sample loop."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DigitsCNN()
    images = torch.from_numpy(digits()[0][:pool])
    gradnorm_scores(model, images[:8], entropy_loss)  # first-call set-up of torch.func

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    batched_s, batched = best(lambda: gradnorm_scores(model, images, entropy_loss))
    loop_s, loop = best(lambda: gradnorm_scores_loop(model, images, entropy_loss))
    egl_s, _ = best(lambda: egl_scores(model, images))
    return {"pool": pool, "batched_s": batched_s, "loop_s": loop_s, "speedup": loop_s / batched_s,
            "max_abs_diff": float((batched - loop).abs().max()), "egl_batched_s": egl_s}


def flower_run(out: Path) -> dict:
    from server.record import load_history
    from simulations.launcher import simulate

    start = time.perf_counter()
    run_dir = simulate(load_scenario("active-learning"), out=out / "runs")
    history = load_history(run_dir)
    finals = {arm: rows[-1]["accuracy"] for arm, rows in history["strategies"].items()}
    return {"wall_s": time.perf_counter() - start, "run_dir": str(run_dir), "finals_seed0": finals}


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for mode in MODES:
        random_final = {r["seed"]: r["accuracy"][-1] for r in runs if r["mode"] == mode and r["rule"] == "random"}
        for rule in RULES:
            mine = sorted((r for r in runs if r["mode"] == mode and r["rule"] == rule), key=lambda r: r["seed"])
            curves = np.array([r["accuracy"] for r in mine])
            gains = np.array([r["accuracy"][-1] - random_final[r["seed"]] for r in mine])
            out[f"{mode}/{rule}"] = {
                "labels": mine[0]["labels"], "mean_curve": curves.mean(0).tolist(),
                "sd_curve": curves.std(0).tolist(), "final_mean": float(curves[:, -1].mean()),
                "final_sd": float(curves[:, -1].std()), "auc_mean": float(curves.mean()),
                "gain_mean": float(gains.mean()), "gain_sd": float(gains.std()),
                "seeds_above_random": int((gains > 0).sum()), "seeds_below_random": int((gains < 0).sum()),
                "seconds_per_run": float(np.mean([r["seconds"] for r in mine])),
            }
    return out


def table(summary: dict, seeds: int) -> str:
    labels = next(iter(summary.values()))["labels"]
    lines = [f"Test accuracy at each label budget (mean over {seeds} seeds; final: mean ± sd; "
             "gain: paired vs random, mean ± sd, seeds above/below)", "",
             "| mode | rule | " + " | ".join(f"@{int(x)}" for x in labels) + " | final | gain vs random | above/below | s/run |",
             "|---|---|" + "---|" * (len(labels) + 4)]
    for arm, s in summary.items():
        mode, rule = arm.split("/")
        lines.append(f"| {mode} | {rule} | " + " | ".join(f"{a:.3f}" for a in s["mean_curve"])
                     + f" | {s['final_mean']:.3f} ± {s['final_sd']:.3f} | {100 * s['gain_mean']:+.1f} ± "
                     f"{100 * s['gain_sd']:.1f} pt | {s['seeds_above_random']}/{s['seeds_below_random']} "
                     f"| {s['seconds_per_run']:.1f} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, MODES):
        for i, rule in enumerate(RULES):
            s = summary[f"{mode}/{rule}"]
            x, m, sd = np.array(s["labels"]), np.array(s["mean_curve"]), np.array(s["sd_curve"])
            style = "--" if rule == "expected-gradnorm" else "-"  # identical to entropy-gradnorm
            ax.plot(x, m, style, marker="o", markersize=3, color=f"C{i}", label=rule)
            ax.fill_between(x, m - sd, m + sd, color=f"C{i}", alpha=0.12)
        ax.set_title(f"{mode}")
        ax.set_xlabel("labels used")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± sd over seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-flower", action="store_true", help="skip the timed Flower run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    jobs = [(m, r, s) for s in range(args.seeds) for m in MODES for r in RULES]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(one_run, jobs))
    summary = summarise(runs)
    result = {"seeds": args.seeds, "runs": runs, "summary": summary,
              "reference_wall_s": time.perf_counter() - start, "scorer": scorer_speed()}
    if not args.no_flower:
        result["flower"] = flower_run(args.out)
    (args.out / "active_learning.json").write_text(json.dumps(result, indent=1))
    plot(summary, args.out / "active_learning.png")

    print(table(summary, args.seeds))
    sc = result["scorer"]
    print(f"\nScoring {sc['pool']} digits (entropy-gradnorm, one thread): batched {sc['batched_s']:.3f} s, "
          f"loop {sc['loop_s']:.3f} s, speed-up {sc['speedup']:.1f}x (max |diff| {sc['max_abs_diff']:.1e}); "
          f"EGL batched {sc['egl_batched_s']:.3f} s")
    if "flower" in result:
        print(f"Built-in scenario through Flower (5 rules federated + centralised): {result['flower']['wall_s']:.0f} s")
    print(f"\nwrote {args.out / 'active_learning.json'} and {args.out / 'active_learning.png'}")


if __name__ == "__main__":
    main()
