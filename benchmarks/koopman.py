"""Koopman neural operators on Burgers: solver, centralised KNO, rollout, federation.

1. Solver: relative L2 against the exact Cole-Hopf solution, and the cost of generating a
   solve with subnormal floats flushed against kept (same numbers, ratio of seconds).
2. Centralised KNO, one per viscosity (256 training / 64 test trajectories, 256 points,
   u0 -> u(0.5), one-cycle Adam): test error at 128/256/512 points with the same weights
   (mesh independence), against predicting u0 and zero, and the training time. The AFNO
   variant of the family on the same data.
3. Rollout: a one-step model (dt = 0.05) rolled out ten steps against the direct model, with
   the error after every step.
4. Federation (the ``koopman-burgers`` scenario, in-process reference: the same arithmetic
   as the Flower run, which the tests check): every strategy and baseline, the error per
   viscosity group, the ARI of the clients' choices, seconds; and the ν-blind floor.
5. Rounds (``--parts rounds``, not in the default set: about 10 minutes): clustered-fedavg
   as the scenario runs it against the levers on rounds, more local work per round (fewer
   rounds, the cosine schedule over them) and a server step with momentum: the first round
   at which each viscosity's error reaches the scenario run's final one, and the clients'
   local steps until then.

Usage: python benchmarks/koopman.py [--epochs 200] [--rollout-epochs 20] [--parts solver,centralised,rollout,federated]
Writes ``benchmarks/results/koopman.json`` and ``koopman_rollout.png``; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from simulations.launcher import baseline_runs  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.koopman import BASELINES  # noqa: E402
from workloads.koopman.burgers import cole_hopf_sine, random_initial, solve  # noqa: E402
from workloads.koopman.centralised import (  # noqa: E402
    baseline_errors, blind_floor, dataset, rollout_errors, train_model,
)

VISCOSITIES = (0.005, 0.015, 0.05)


def solver_checks() -> dict:
    out = {"cole_hopf": {}}
    x = np.arange(1024) / 1024
    for nu in VISCOSITIES:
        u = solve(np.sin(2 * np.pi * x), nu, np.array([0.0, 0.5]), 1e-4)[0, -1]
        exact = cole_hopf_sine(nu, 0.5, x)
        out["cole_hopf"][nu] = float(np.linalg.norm(u - exact) / np.linalg.norm(exact))
    # Subnormals: the same solve with and without flushing, alternated, best of two each
    # (1024 points, 5000 steps: where the spec saw a 3-4x slowdown).
    import workloads.koopman.burgers as burgers
    from contextlib import nullcontext

    u0 = random_initial(32, 1024, np.random.default_rng(0))
    times, flushing = np.array([0.0, 0.5]), burgers.flushed_denormals
    seconds: dict[str, list[float]] = {"flushed": [], "kept": []}
    results = {}
    try:
        solve(u0[:2], 0.05, np.array([0.0, 0.01]), 1e-4)  # warm-up
        for _ in range(2):
            for name, context in (("flushed", flushing), ("kept", nullcontext)):
                burgers.flushed_denormals = context
                start = time.perf_counter()
                results[name] = solve(u0, 0.05, times, 1e-4)
                seconds[name].append(time.perf_counter() - start)
    finally:
        burgers.flushed_denormals = flushing
    out["flushed_s"], out["subnormal_s"] = min(seconds["flushed"]), min(seconds["kept"])
    out["flush_speedup"] = out["subnormal_s"] / out["flushed_s"]
    out["flush_max_diff"] = float(np.abs(results["flushed"] - results["kept"]).max())
    return out


def centralised(epochs: int) -> dict:
    out = {}
    for g, nu in enumerate(VISCOSITIES):
        data = dataset(nu, 256, 64, group=g)
        row = {**{f"{k}_baseline": v for k, v in baseline_errors(data).items()}}
        for model in ("kno", "afno"):
            if model == "afno" and nu != VISCOSITIES[0]:
                continue
            net, seconds = train_model(data, step=10, epochs=epochs, model=model)
            errors = {grid: float(rollout_errors(net, data, step=10, grid=grid)[-1]) for grid in (128, 256, 512)}
            row[model] = {"errors": errors, "seconds": seconds,
                          "mesh_ratio_512": errors[512] / errors[256]}
        out[nu] = row
        print(nu, row, flush=True)
    return out


def rollout(epochs: int, direct_epochs: int) -> dict:
    nu = VISCOSITIES[0]
    data = dataset(nu, 256, 64)
    one_step, one_s = train_model(data, step=1, epochs=epochs)
    direct, direct_s = train_model(data, step=10, epochs=direct_epochs)
    curve = rollout_errors(one_step, data, step=1)
    direct_error = float(rollout_errors(direct, data, step=10)[-1])
    return {"nu": nu, "one_step_curve": curve.tolist(), "one_step_seconds": one_s,
            "direct_error": direct_error, "direct_seconds": direct_s,
            "ratio_at_T": float(curve[-1] / direct_error), "t": data.times[1:].tolist()}


def federated() -> dict:
    scenario = load_scenario("koopman-burgers", [f"koopman.baselines={list(BASELINES)}"])
    runs = {name: (scenario, name) for name in [*scenario["run"]["strategies"], "oracle"]}
    runs.update(baseline_runs(scenario))
    out = {}
    for name, (sc, strategy) in runs.items():
        start = time.perf_counter()
        rows = Reference(sc).run(strategy, keep_models=False)
        final = rows[-1]
        out[name] = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        out[name]["seconds"] = time.perf_counter() - start
        out[name]["round0_ari"] = rows[0].get("ari")
        print(name, out[name], flush=True)
    out["blind_floor"] = {str(k): v for k, v in blind_floor(VISCOSITIES, 64).items()}
    return out


ROUND_ARMS = {  # label -> overrides of the koopman-burgers scenario (clustered-fedavg only)
    "scenario (25 rounds x 32 steps)": [],
    "more local work (12 rounds x 96 steps)": ["run.rounds=12", "train.local_steps=96"],
    "server momentum 0.5 (25 rounds x 32 steps)": ["clustered.server_momentum=0.5"],
}


def rounds_to_target() -> dict:
    """Per arm: per-viscosity curves, the first round at or under the scenario arm's final
    error for each viscosity, and local steps per client until every viscosity got there."""
    out, target = {}, None
    for label, overrides in ROUND_ARMS.items():
        scenario = load_scenario("koopman-burgers", ["run.strategies=['clustered-fedavg']", *overrides])
        start = time.perf_counter()
        rows = Reference(scenario).run("clustered-fedavg", keep_models=False)
        groups = [k for k in rows[-1] if k.startswith("rel_l2_nu")]
        curves = {g: [r[g] for r in rows] for g in groups}
        target = target or {g: c[-1] for g, c in curves.items()}  # the first arm is the scenario's
        reach = {g: next((i for i, e in enumerate(c) if e <= target[g]), None) for g, c in curves.items()}
        every = None if None in reach.values() else max(reach.values())
        steps = scenario["train"]["local_steps"]
        out[label] = {"curves": curves, "final": {g: c[-1] for g, c in curves.items()}, "reach": reach,
                      "rounds_to_all": every, "steps_to_all": None if every is None else every * steps,
                      "seconds": time.perf_counter() - start}
        print(label, {g: round(v, 4) for g, v in out[label]["final"].items()}, reach, flush=True)
    return out


def tables(results: dict) -> str:
    lines = []
    s = results.get("solver")
    lines += [] if s is None else ["Solver against Cole-Hopf (u0 = sin 2πx, T = 0.5, 1024 points, dt 1e-4): "
              + ", ".join(f"ν={k}: {v:.1e}" for k, v in s["cole_hopf"].items()),
              f"Subnormals flushed: {s['flushed_s']:.2f} s against {s['subnormal_s']:.2f} s kept "
              f"({s['flush_speedup']:.1f}x; largest difference {s['flush_max_diff']:.1e})", ""]
    if "rounds" in results:
        r = results["rounds"]
        first = next(iter(r.values()))
        groups = list(first["final"])
        base_steps = first["steps_to_all"]
        lines += ["| arm | final " + " / ".join(g.removeprefix("rel_l2_") for g in groups)
                  + " | first round at the scenario's final, per ν | rounds to all | local steps to all (÷ scenario) |",
                  "|---|---|---|---|---|"]
        for label, row in r.items():
            reach = " / ".join("–" if row["reach"][g] is None else str(row["reach"][g]) for g in groups)
            every = "–" if row["rounds_to_all"] is None else str(row["rounds_to_all"])
            steps = "–" if row["steps_to_all"] is None else f"{row['steps_to_all']} ({row['steps_to_all'] / base_steps:.2f})"
            lines.append(f"| {label} | " + " / ".join(f"{row['final'][g]:.4f}" for g in groups)
                         + f" | {reach} | {every} | {steps} |")
        lines.append("")
    if "centralised" in results:
        lines += ["| ν | model | rel L2 @128 | @256 | @512 | 512/256 - 1 | predict u0 | predict 0 | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for nu, row in results["centralised"].items():
            for model in ("kno", "afno"):
                if model in row:
                    e = row[model]["errors"]
                    lines.append(f"| {nu} | {model} | {e['128']:.4f} | {e['256']:.4f} | {e['512']:.4f} | "
                                 f"{row[model]['mesh_ratio_512'] - 1:+.4f} | {row['u0_baseline']:.3f} | 1 | "
                                 f"{row[model]['seconds']:.0f} |")
        lines.append("")
    if "rollout" in results:
        r = results["rollout"]
        lines += [f"Rollout (ν={r['nu']}): one-step model after 10 steps {r['one_step_curve'][-1]:.4f} "
                  f"against the direct model {r['direct_error']:.4f} (ratio {r['ratio_at_T']:.2f}); "
                  "per step: " + ", ".join(f"{e:.4f}" for e in r["one_step_curve"]), ""]
    if "federated" in results:
        f = results["federated"]
        groups = [k for k in next(iter(f.values())) if k.startswith("rel_l2_nu")]
        lines += ["| arm | " + " | ".join(groups) + " | mean | ARI | s |",
                  "|---|" + "---|" * (len(groups) + 3)]
        for arm, row in f.items():
            if arm == "blind_floor":
                continue
            lines.append(f"| {arm} | " + " | ".join(f"{row[g]:.4f}" for g in groups)
                         + f" | {row['rel_l2']:.4f} | {row.get('ari', '–') if row.get('ari') is None else round(row['ari'], 3)} | {row['seconds']:.0f} |")
        lines.append("| ν-blind floor | " + " | ".join(f"{v:.4f}" for v in f["blind_floor"].values()) + " | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--rollout-epochs", type=int, default=20)
    parser.add_argument("--parts", default="solver,centralised,rollout,federated",
                        help="comma-separated parts to run; results merge into an existing koopman.json")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    path = args.out / "koopman.json"
    results: dict = json.loads(path.read_text()) if path.is_file() else {}
    parts = {
        "solver": solver_checks,
        "centralised": lambda: centralised(args.epochs),
        "rollout": lambda: rollout(args.rollout_epochs, args.epochs),
        "federated": federated,
        "rounds": rounds_to_target,
    }
    for part in args.parts.split(","):
        results[part] = parts[part]()
        results[f"{part}_date"] = time.strftime("%Y-%m-%d")
    path.write_text(json.dumps(results, indent=1, default=str))
    results = json.loads(path.read_text())  # the same keys (strings) whichever parts ran
    if "rollout" in results:
        plot_rollout(results["rollout"], args.out)
    print(tables(results))


def plot_rollout(r: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(r["t"], r["one_step_curve"], marker="o", label="one-step model, rolled out")
    ax.axhline(r["direct_error"], color="k", linestyle="--", label="direct model at T")
    ax.set_xlabel("time")
    ax.set_ylabel("relative L2 (test)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "koopman_rollout.png", dpi=110)


if __name__ == "__main__":
    main()
