"""SNF-style filter pruning, federated: searched widths against uniform and random widths and
the dense model, at FLOPs cuts of 50% and 65%, paired over seeds.

For every seed, the ``snf-pruning`` federation (5 clients, Dirichlet(0.5) class mixes) with
the spec's ResNet-14 (16/32/64 channels, 6.59 M MACs) through the round engine in one process
(the same code as the Flower run). The dense phase is the same for every arm, so it runs
once per seed: ``--dense-rounds`` rounds of FedAvg; every arm then starts from that model with
``snf.dense_rounds = 0`` (round 1 is the search round, the next ``--finetune-rounds`` fine-tune):

- ``dense``: the dense model trained on for the same fine-tuning rounds;
- per cut: ``uniform`` widths, ``random`` widths (one seeded draw from the search space),
  ``random-wide`` widths (one draw from the spec's wider space, layers keeping down to a tenth) and
  ``searched`` widths (the scenario's proxy: BN reset + 10 local fine-tune steps, validation
  accuracy), L1 filters; ``searched-bn`` scores by BN reset alone (the spec's proxy) and
  ``searched-loss`` by validation loss after the same fine-tune steps.

Usage: python benchmarks/snf.py [--seeds 0,1,2] [--cuts 0.5,0.65] [--arms ...] [--dense-rounds 20]
       [--finetune-rounds 8] [--tag long] [--flower] [--tables]
Writes ``benchmarks/results/snf.json`` (after every seed); prints Markdown tables (mean ± sd
over seeds; paired differences with the worst and best seed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402

OUT = Path(__file__).parent / "results"
BENCH = ["snf.widths=[16, 32, 64]", "snf.test_views=4", "snf.candidates=16", "snf.proxy_steps=10",
         "train.local_steps=15", "train.lr=0.003"]
# arm -> (method, scenario overrides)
ARMS = {
    "uniform": ("uniform", []),
    "random": ("random", []),
    "random-wide": ("random-wide", []),
    "searched": ("searched", []),
    "searched-bn": ("searched", ["snf.proxy='bn-reset'"]),
    "searched-loss": ("searched", ["snf.score='loss'"]),
}


def dense_model(seed: int, rounds: int) -> tuple[dict, list[float], float]:
    scenario = load_scenario("snf-pruning", [*BENCH, "snf.methods=['dense']", f"run.rounds={rounds}",
                                             f"snf.dense_rounds={rounds}", "train.lr_schedule='cosine'"], seed=seed)
    start = time.perf_counter()
    rows = Reference(scenario).run("fedavg", variant="dense")
    models = rows[-1]["models"]
    return {n: v[0] for n, v in models.items()}, [r["accuracy"] for r in rows], time.perf_counter() - start


def branch(seed: int, start: dict, method: str, cut: float | None, extra: list[str], finetune: int) -> dict:
    cuts = [] if cut is None else [cut]
    scenario = load_scenario("snf-pruning", [*BENCH, *extra, f"snf.methods=['{method}']", f"snf.cuts={cuts}",
                                             "snf.dense_rounds=0", f"run.rounds={finetune + 1}"], seed=seed)
    ref = Reference(scenario)
    variant = ref.workload.variants()[0]
    t0 = time.perf_counter()
    rows = ref.run("fedavg", variant=variant, start=start, keep_models=False)
    last = rows[-1]
    search_s = rows[1]["wall_time_s"] if len(rows) > 1 else 0.0  # round 1: the search round
    return {"accuracy": last["accuracy"], "flops_cut": last["flops_cut"], "mflops": last["mflops"],
            "widths": last["final"]["widths"], "scores": last["final"]["search_scores"],
            "curve": [r["accuracy"] for r in rows], "seconds": time.perf_counter() - t0,
            "search_round_s": search_s if method == "searched" else 0.0,
            "picked": int(np.argmax(last["final"]["search_scores"])) if method == "searched" else None}


def one_seed(seed: int, cuts: list[float], arms: list[str], dense_rounds: int, finetune: int,
             bn_cuts: list[float]) -> dict:
    start, curve, secs = dense_model(seed, dense_rounds)
    out = {"dense_phase": {"curve": curve, "seconds": secs}}
    out["dense"] = branch(seed, start, "dense", None, [], finetune)
    print(seed, "dense", round(curve[-1], 4), "->", round(out["dense"]["accuracy"], 4), f"{secs:.0f} s", flush=True)
    for cut in cuts:
        for arm in arms:
            if arm == "searched-bn" and cut not in bn_cuts:
                continue
            method, extra = ARMS[arm]
            r = branch(seed, start, method, cut, extra, finetune)
            out[f"{arm}@{cut:g}"] = r
            print(seed, f"{arm}@{cut:g}", round(r["accuracy"], 4), f"cut {r['flops_cut']:.3f}", r["widths"],
                  f"{r['seconds']:.0f} s", flush=True)
    return out


def ceiling(seed: int, cut: float, dense_rounds: int, finetune: int) -> dict:
    """Every candidate of the search's pool pruned and fine-tuned full length, from the same
    dense model: the accuracy each possible pick ends at. The pool's random candidates are
    draws from the ``random`` arm's distribution, so their mean is what a random pick
    expects and their best (chosen on the test set: an optimistic ceiling) bounds what any
    proxy picking from this pool could reach."""
    start, _, _ = dense_model(seed, dense_rounds)
    cls = type(Reference(load_scenario("snf-pruning", BENCH, seed=seed)).workload)
    original = cls.widths_for
    out = []
    try:
        for k in range(16):
            # the benchmark's only patch: the uniform arm prunes to candidate k instead
            cls.widths_for = lambda self, method, cut, scores, k=k: self.pool(cut)[k]
            r = branch(seed, start, "uniform", cut, [], finetune)
            out.append({"candidate": k, "accuracy": r["accuracy"], "widths": r["widths"]})
            print(seed, f"candidate {k}@{cut:g}", round(r["accuracy"], 4), r["widths"], f"{r['seconds']:.0f} s",
                  flush=True)
    finally:
        cls.widths_for = original
    return {"candidates": out}


def ceiling_table(results: dict) -> str:
    lines = ["| seed | uniform (candidate 0) | random candidates: mean ± sd | best random candidate | "
             "best minus mean | uniform minus mean |", "|---|---|---|---|---|---|"]
    gaps = []
    for seed, r in sorted(results["ceiling"].items(), key=lambda kv: int(kv[0])):
        acc = 100 * np.array([c["accuracy"] for c in r["candidates"]])
        rand = acc[1:]
        gaps.append(rand.max() - rand.mean())
        lines.append(f"| {seed} | {acc[0]:.2f} | {rand.mean():.2f} ± {rand.std():.2f} | {rand.max():.2f} "
                     f"(candidate {int(np.argmax(rand)) + 1}) | {rand.max() - rand.mean():+.2f} | "
                     f"{acc[0] - rand.mean():+.2f} |")
    lines += ["", f"Best random candidate minus the random mean, over seeds: {np.mean(gaps):+.2f} "
              f"(smallest {np.min(gaps):+.2f}, largest {np.max(gaps):+.2f})."]
    return "\n".join(lines)


def flower_timing() -> dict:
    """s/round of the built-in scenario through Flower (simulation engine on Ray) and through
    the in-process engine (FedAvg, the searched arm at 50%)."""
    from server.record import load_history
    from simulations.launcher import simulate

    scenario = load_scenario("snf-pruning", ["snf.methods=['searched']", "snf.cuts=[0.5]"])
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_history(simulate(scenario, out=Path(tmp)))["strategies"]["fedavg/searched@0.5"]
    flower = float(np.median([r["wall_time_s"] for r in rows if r["round"] >= 2]))
    start = time.perf_counter()
    local = Reference(scenario).run("fedavg", variant="searched@0.5", keep_models=False)
    in_process = float(np.median([r["wall_time_s"] for r in local if r["round"] >= 2]))
    return {"flower_s_per_round": flower, "in_process_s_per_round": in_process,
            "in_process_total_s": time.perf_counter() - start,
            "same_final_accuracy": rows[-1]["accuracy"] == local[-1]["accuracy"]}


def _ms(v: np.ndarray, pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    return f"{f * v.mean():.2f} ± {f * v.std():.2f}"


def tables(results: dict) -> str:
    per_seed = results["seeds"]
    seeds = sorted(per_seed, key=int)
    s = results["settings"]
    lines = [f"SNF pruning, ResNet-14 on hard digits, 5 clients (Dirichlet 0.5), FedAvg: {s['dense_rounds']} dense rounds, "
             f"1 search round, {s['finetune_rounds']} fine-tune rounds; seeds {', '.join(seeds)}.", "",
             "| arm | FLOPs cut | accuracy % | vs dense model pruned (worst seed) | vs dense trained as long (worst) "
             f"| vs uniform (worst to best) | widths (seed {seeds[0]}) | s |", "|---|---|---|---|---|---|---|---|"]
    dense = np.array([per_seed[k]["dense"]["accuracy"] for k in seeds])
    phase = np.array([per_seed[k]["dense_phase"]["curve"][-1] for k in seeds])
    lines.append(f"| dense (after the dense phase) | 0 | {_ms(phase)} | | | | | "
                 f"{np.mean([per_seed[k]['dense_phase']['seconds'] for k in seeds]):.0f} |")
    arms = [a for a in per_seed[seeds[0]] if a not in ("dense_phase",)]
    for arm in arms:
        acc = np.array([per_seed[k][arm]["accuracy"] for k in seeds])
        cut = np.array([per_seed[k][arm]["flops_cut"] for k in seeds])
        d, p = 100 * (acc - dense), 100 * (acc - phase)
        vs_dense = f"{d.mean():+.2f} ({d.min():+.2f})" if arm != "dense" else ""
        vs_phase = f"{p.mean():+.2f} ({p.min():+.2f})"
        vs_uni = ""
        if "@" in arm and not arm.startswith("uniform"):
            uni = np.array([per_seed[k][f"uniform@{arm.split('@')[1]}"]["accuracy"] for k in seeds]) \
                if f"uniform@{arm.split('@')[1]}" in per_seed[seeds[0]] else None
            if uni is not None:
                u = 100 * (acc - uni)
                vs_uni = f"{u.mean():+.2f} ± {u.std():.2f} ({u.min():+.2f} to {u.max():+.2f})"
        widths = per_seed[seeds[0]][arm]["widths"]
        secs = np.mean([per_seed[k][arm]["seconds"] for k in seeds])
        lines.append(f"| {arm} | {100 * cut.mean():.1f}% | {_ms(acc)} | {vs_phase} | {vs_dense} | {vs_uni} | "
                     f"{'/'.join(str(w) for w in widths)} | {secs:.0f} |")
    lines += ["", "Searched minus random widths (paired, points; `random`: from the search space, "
              "`random-wide`: from the spec's wider space):", ""]
    for arm in arms:
        if arm.startswith("searched"):
            c = arm.split("@")[1]
            for rand in ("random", "random-wide"):
                if f"{rand}@{c}" in per_seed[seeds[0]]:
                    d = 100 * np.array([per_seed[k][arm]["accuracy"] - per_seed[k][f"{rand}@{c}"]["accuracy"]
                                        for k in seeds])
                    lines.append(f"- {arm} - {rand}: {d.mean():+.2f} ± {d.std():.2f} (worst {d.min():+.2f})")
    search = [per_seed[k][a]["search_round_s"] for k in seeds for a in arms if a.startswith("searched@")]
    bn = [per_seed[k][a]["search_round_s"] for k in seeds for a in arms if a.startswith("searched-bn@")]
    dense_round = np.mean([per_seed[k]["dense_phase"]["seconds"] / s["dense_rounds"] for k in seeds])
    picks = {a: [per_seed[k][a]["picked"] for k in seeds] for a in arms if a.startswith("searched")}
    if search:
        lines += ["", f"Search cost (in-process, one core): the search round took {np.mean(search):.1f} s with the "
                  f"fine-tune proxy ({s['candidates']} candidates x ({s['proxy_steps']} local steps + a BN reset) x 5 "
                  f"clients; {s['candidates'] * s['proxy_steps']} local steps per client, "
                  f"{s['candidates'] * s['proxy_steps'] / s['local_steps']:.1f}x a training round's)"
                  + (f", {np.mean(bn):.1f} s with BN reset alone" if bn else "")
                  + f"; a dense training round took {dense_round:.1f} s.",
                  "", "Candidate picked per seed (0 = the uniform widths): "
                  + "; ".join(f"{a}: {v}" for a, v in picks.items()) + "."]
    if "flower" in results:
        f = results["flower"]
        lines.append(f"Scenario arm through Flower: {f['flower_s_per_round']:.3f} s/round; in-process engine "
                     f"{f['in_process_s_per_round']:.3f} s/round; same final accuracy: {f['same_final_accuracy']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cuts", default="0.5,0.65")
    parser.add_argument("--arms", default="uniform,random,searched,searched-bn")
    parser.add_argument("--bn-cuts", default="0.65", help="cuts at which searched-bn runs")
    parser.add_argument("--dense-rounds", type=int, default=20)
    parser.add_argument("--finetune-rounds", type=int, default=8)
    parser.add_argument("--flower", action="store_true", help="also time the scenario through Flower")
    parser.add_argument("--tables", action="store_true", help="print the tables of the saved results and stop")
    parser.add_argument("--ceiling", type=float, default=None, metavar="CUT",
                        help="fine-tune every candidate of the pool at CUT full length (the ceiling of any pick)")
    parser.add_argument("--tag", default="", help="write results/snf-<tag>.json (e.g. a longer fine-tune)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = OUT / (f"snf-{args.tag}.json" if args.tag else "snf.json")
    if args.tables:
        saved = json.loads(path.read_text())
        print(ceiling_table(saved) if "ceiling" in saved else tables(saved))
        return
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; expected some of {list(ARMS)}")
    start = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    if args.ceiling is not None:
        results = {"settings": {"cut": args.ceiling, "dense_rounds": args.dense_rounds,
                                "finetune_rounds": args.finetune_rounds, "overrides": BENCH}, "ceiling": {}}
        for seed in args.seeds.split(","):
            results["ceiling"][seed] = ceiling(int(seed), args.ceiling, args.dense_rounds, args.finetune_rounds)
            results["seconds"] = time.perf_counter() - start
            path.write_text(json.dumps(results, indent=1, default=float))
        print(ceiling_table(results))
        return
    results: dict = {"settings": {"dense_rounds": args.dense_rounds, "finetune_rounds": args.finetune_rounds,
                                  "candidates": 16, "proxy_steps": 10, "local_steps": 15, "overrides": BENCH}, "seeds": {}}
    OUT.mkdir(exist_ok=True)
    for seed in args.seeds.split(","):
        results["seeds"][seed] = one_seed(int(seed), [float(c) for c in args.cuts.split(",")], arms,
                                          args.dense_rounds, args.finetune_rounds,
                                          [float(c) for c in args.bn_cuts.split(",") if c])
        results["seconds"] = time.perf_counter() - start
        path.write_text(json.dumps(results, indent=1, default=float))
    if args.flower:
        results["flower"] = flower_timing()
    results["seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(results, indent=1, default=float))
    print(tables(results))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
