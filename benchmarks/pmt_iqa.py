"""PMT-IQA against its ablations and the per-level scorer, centralised and federated, paired
over seeds on fixed folds.

For every seed s, the ``pmt-iqa`` federation (4 clients, each mostly of one distortion
family) with held-out fold s mod 5 of the source photos (unseen content), through the round
engine in one process (the same code as the Flower run):

- ``centralised``: one client holding every client's patches (``iqa.pool_clients``),
  ``--central-rounds`` x ``--central-steps`` Adam steps;
- ``fedavg``: the 4 clients, ``--fed-rounds`` rounds of ``--fed-steps`` local steps each:
  by default every client takes the 2,500 steps the centralised model takes (100 x 25), so
  the averaged model moves as many steps (at 4x the gradient evaluations in all); 25 rounds
  of 25 would give it a quarter of the centralised model's steps;
- ``clustered`` (``--clustered``): clustered FedAvg (anchor models) and IFCA on the same
  federation: ARI against the families, SRCC per family.

Every arm of a seed starts from the same initial network and sees the same patches (paired);
the step size follows a cosine schedule over the rounds; PMT's task weights follow the
rounds. The reference line is the per-(distortion, level) mean training score, a scorer told
what the blind models must infer.

Usage: python benchmarks/pmt_iqa.py [--seeds 0,1,2,3,4] [--settings centralised,fedavg]
       [--central-rounds 10] [--central-steps 250] [--fed-rounds 100] [--fed-steps 25]
       [--arms single-task,ms,ms-fixed,pmt] [--clustered] [--set iqa.proxy='ssim' ...]
       [--flower] [--inference] [--tables] [--tag NAME]
Writes ``benchmarks/results/pmt_iqa[-TAG].json`` (after every run); prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from simulations.reference import Reference, flower_against_in_process  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.pmt_iqa.data import DISTORTIONS  # noqa: E402

OUT = Path(__file__).parent / "results"
ARMS = ("single-task", "ms", "ms-fixed", "pmt")
BENCH = ["iqa.crops_per_source=32", "iqa.baselines=[]"]
PAIRS = (("ms", "single-task"), ("pmt", "ms"), ("pmt", "ms-fixed"), ("pmt", "single-task"),
         ("ms-fixed", "ms"))


def scenario_for(setting: str, seed: int, args: argparse.Namespace, arms: list[str]) -> dict:
    common = [*BENCH, *args.set, f"iqa.fold={seed % 5}", f"iqa.arms={arms}", "train.lr_schedule='cosine'"]
    if setting == "centralised":
        over = ["federation.clients=1", "iqa.pool_clients=4", "anchors.count=0", "run.strategies=['fedavg']",
                f"run.rounds={args.central_rounds}", f"train.local_steps={args.central_steps}"]
    else:
        strategies = ["clustered-fedavg", "ifca"] if setting == "clustered" else ["fedavg"]
        over = [f"run.strategies={strategies}", f"run.rounds={args.fed_rounds}", f"train.local_steps={args.fed_steps}"]
    return load_scenario("pmt-iqa", common + over, seed=seed)


def summary(row: dict) -> dict:
    keep = ("srcc", "plcc", "mae", "srcc_level_scorer", "ari", *(f"srcc_{d}" for d in DISTORTIONS),
            *(f"srcc_family{g}" for g in range(3)))
    return {k: float(row[k]) for k in keep if k in row}


def run_setting(setting: str, seed: int, args: argparse.Namespace, arms: list[str]) -> dict:
    scenario = scenario_for(setting, seed, args, arms)
    ref = Reference(scenario)
    out = {}
    for strategy in scenario["run"]["strategies"]:
        for arm in arms:
            t0 = time.perf_counter()
            rows = ref.run(strategy, variant=arm, keep_models=False)
            r = summary(rows[-1])
            r["curve"] = [float(x["srcc"]) for x in rows]
            r["seconds"] = time.perf_counter() - t0
            name = arm if setting != "clustered" else f"{strategy}/{arm}"
            out[name] = r
            print(seed, setting, name, f"srcc {r['srcc']:.3f} plcc {r['plcc']:.3f} "
                  f"(scorer {r['srcc_level_scorer']:.3f})", f"{r['seconds']:.0f} s", flush=True)
    return out


def _ms(v: np.ndarray) -> str:
    return f"{v.mean():.3f} ± {v.std():.3f}"


def tables(results: dict) -> str:
    lines: list[str] = []
    for setting, per_seed in results["runs"].items():
        seeds = sorted(per_seed, key=int)
        if not seeds:
            continue
        names = list(per_seed[seeds[0]])
        first = per_seed[seeds[0]][names[0]]
        present = [f"srcc_{d}" for d in DISTORTIONS if f"srcc_{d}" in first]
        present += [f"srcc_family{g}" for g in range(3) if f"srcc_family{g}" in first]
        lines += [f"#### {setting} (seeds {', '.join(seeds)}; seed s holds out fold s mod 5)", "",
                  "| arm | SRCC | PLCC | SRCC minus the level scorer (seeds above) | "
                  + " | ".join(c.removeprefix("srcc_") for c in present) + (" | ARI |" if setting == "clustered" else " |"),
                  "|---|---|---|---|" + "---|" * len(present) + ("---|" if setting == "clustered" else "")]
        scorer = np.array([per_seed[k][names[0]]["srcc_level_scorer"] for k in seeds])
        for name in names:
            get = lambda key: np.array([per_seed[k][name].get(key, np.nan) for k in seeds])  # noqa: E731
            srcc = get("srcc")
            gap = srcc - scorer
            cells = [_ms(get("srcc")), _ms(get("plcc")), f"{gap.mean():+.3f} ({int((gap > 0).sum())}/{len(seeds)})"]
            cells += [f"{np.nanmean(get(c)):.2f}" for c in present]
            if setting == "clustered":
                cells.append(f"{np.nanmean(get('ari')):.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(f"| per-level scorer (told distortion and level) | {_ms(scorer)} | | | "
                     + " | ".join("" for _ in present) + (" | |" if setting == "clustered" else " |"))
        lines += ["", "Paired SRCC differences (mean ± sd over seeds, worst seed; *beyond spread*: mean above the sd):", ""]
        prefixes = sorted({n.rsplit("/", 1)[0] for n in names if "/" in n}) or [""]
        for prefix in prefixes:
            for a, b in PAIRS:
                na, nb = (f"{prefix}/{a}", f"{prefix}/{b}") if prefix else (a, b)
                if na in names and nb in names:
                    d = np.array([per_seed[k][na]["srcc"] - per_seed[k][nb]["srcc"] for k in seeds])
                    beyond = " *beyond spread*" if d.mean() > d.std() else ""
                    lines.append(f"- {na} - {nb}: {d.mean():+.3f} ± {d.std():.3f} (worst {d.min():+.3f}){beyond}")
        secs = np.mean([per_seed[k][n]["seconds"] for k in seeds for n in names])
        lines += ["", f"Mean wall time per run: {secs:.0f} s (one core).", ""]
    if "flower" in results:
        f = results["flower"]
        lines.append(f"Scenario arm through Flower: {f['flower_s_per_round']:.3f} s/round; in-process engine "
                     f"{f['in_process_s_per_round']:.3f} s/round; same final SRCC: {f['same_final_srcc']}.")
    return "\n".join(lines)


def flower_timing() -> dict:
    """s/round of the scenario's PMT arm under FedAvg through Flower and in-process."""
    scenario = load_scenario("pmt-iqa", ["iqa.arms=['pmt']", "run.strategies=['fedavg']", "iqa.baselines=[]"])
    speed = flower_against_in_process(scenario, "fedavg", "pmt", "srcc")
    speed["same_final_srcc"] = speed.pop("same_final")
    return speed


def inference_speed(repeats: int = 3) -> dict:
    """One forward pass over the pooled training patches (fold 0, benchmark size): all at
    once against ``torch_train.in_chunks`` (512 rows), best of ``repeats``."""
    from workloads import torch_train
    from workloads.pmt_iqa.data import IQASettings, build_set
    from workloads.pmt_iqa.model import IQANet

    d = build_set(IQASettings(size=32, crops=32))
    x = torch.from_numpy(d.patches[d.fold != 0])
    net = IQANet().eval()

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        whole = best(lambda: net(x))
    chunked = best(lambda: torch_train.in_chunks(net, x))
    return {"patches": len(x), "whole_s": whole, "chunked_s": chunked, "speedup": whole / chunked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--settings", default="centralised,fedavg")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--central-rounds", type=int, default=10)
    parser.add_argument("--central-steps", type=int, default=250)
    parser.add_argument("--fed-rounds", type=int, default=100)
    parser.add_argument("--fed-steps", type=int, default=25)
    parser.add_argument("--clustered", action="store_true", help="also clustered FedAvg and IFCA")
    parser.add_argument("--set", action="append", default=[], help="scenario override, e.g. iqa.proxy='ssim'")
    parser.add_argument("--flower", action="store_true", help="also time the scenario through Flower")
    parser.add_argument("--inference", action="store_true", help="time one forward pass over the training "
                        "patches, all at once against in chunks of 512, and stop")
    parser.add_argument("--tables", action="store_true", help="print the tables of the saved results and stop")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = OUT / (f"pmt_iqa-{args.tag}.json" if args.tag else "pmt_iqa.json")
    if args.tables:
        print(tables(json.loads(path.read_text())))
        return
    if args.inference:
        r = inference_speed()
        print(f"forward pass over {r['patches']} patches: all at once {r['whole_s']:.2f} s, in chunks of 512 "
              f"{r['chunked_s']:.2f} s ({r['speedup']:.1f}x)")
        return
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arm {unknown[0]!r}; expected some of {list(ARMS)}")
    settings = [s for s in args.settings.split(",") if s] + (["clustered"] if args.clustered else [])
    OUT.mkdir(exist_ok=True)
    results: dict = {"settings": vars(args), "runs": {s: {} for s in settings}}
    start = time.perf_counter()
    for seed in args.seeds.split(","):
        for setting in settings:
            results["runs"][setting][seed] = run_setting(setting, int(seed), args, arms)
            results["seconds"] = time.perf_counter() - start
            path.write_text(json.dumps(results, indent=1, default=float))
    if args.flower:
        results["flower"] = flower_timing()
        path.write_text(json.dumps(results, indent=1, default=float))
    print(tables(results))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
