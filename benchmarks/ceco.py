"""CeCo (the neural-collapse centre regulariser) against plain and class-weighted cross-entropy,
centralised and federated, paired over seeds, and a search over regimes.

For every seed and *regime* (imbalance, training budget, the CeCo arm's lambda and
temperature), the ``ceco-segmentation`` federation (4 clients of 2 scene types) through the
round engine in one process (the same code as the Flower run):

- ``centralised``: one client holding every client's scenes (``ceco.pool_clients``), FedAvg
  of one client: ``--central-rounds`` x ``--central-steps`` Adam steps;
- ``fedavg``: the 4 clients, ``--fed-rounds`` rounds of ``--fed-steps`` local steps;
- ``clustered`` (``--clustered``): clustered FedAvg (anchor models, 2 clusters), per-group models.

Every arm of a seed starts from the same initial network and sees the same scenes (paired).
The step size follows a cosine schedule over the rounds so every run ends converged at its
budget (the mIoU change over the last fifth of the rounds is in the JSON). CE and
weighted-CE runs are shared by the CeCo variants of a regime that differ only in lambda or
temperature. A regime *lifts the tail* when CeCo's mean paired tail-IoU gain over a baseline
exceeds the seed spread (the sd over seeds of that baseline's tail IoU) and its mean paired
mIoU change is above minus the baseline's mIoU spread.

Usage: python benchmarks/ceco.py [--seeds 0,1,2,3,4] [--regimes mild,mild-l0.1-t0.5,...]
       [--settings centralised,fedavg] [--central-rounds 16] [--central-steps 100] [--fed-rounds 20]
       [--fed-steps 20] [--clustered] [--arms ce,weighted-ce,ceco] [--flower] [--tables] [--tag NAME]
A regime ``<imbalance>-inv...`` draws scene type 1 in inverted contrast (the scenario's setting, where
the clustered strategy finds the types); a table then compares clustered FedAvg with FedAvg.
Writes ``benchmarks/results/ceco[-TAG].json`` (after every run); prints Markdown tables.
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

from simulations.launcher import baseline_runs  # noqa: E402
from simulations.reference import Reference, flower_against_in_process  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402

OUT = Path(__file__).parent / "results"
CLASSES = ("background", "disk", "square", "ellipse", "diamond", "ring")


def data_key(name: str) -> str:
    """The part of a regime's name that fixes its data (imbalance, ``-inv``): the CE and weighted-CE
    runs of regimes sharing it are shared."""
    parts = name.split("-")
    return "-".join([parts[0], *(["inv"] if "inv" in parts[1:] else [])])


def regime(name: str) -> tuple[list[str], list[str]]:
    """(data overrides, CeCo overrides) of a regime named ``<imbalance>[-inv][-l<lambda>][-t<temperature>]``,
    e.g. ``mild-l0.1-t0.5``; defaults lambda 0.4, temperature 0.1 (the scenario's); ``inv``: scene type 1
    in inverted contrast (the scenario's setting, under which the clustered strategy finds the types)."""
    parts = name.split("-")
    data = [f"ceco.imbalance='{parts[0]}'"]
    ceco = []
    for p in parts[1:]:
        if p == "inv":
            data.append("ceco.inverted_type1=true")
        elif p.startswith("l"):
            ceco.append(f"ceco.lambda={float(p[1:])}")
        elif p.startswith("t"):
            ceco.append(f"ceco.temperature={float(p[1:])}")
        else:
            raise ValueError(f"unknown regime part {p!r} in {name!r}")
    return data, ceco


def scenario(seed: int, data: list[str], extra: list[str], arm: str, setting: str, args: argparse.Namespace) -> dict:
    common = ["ceco.inverted_type1=false", *data, *extra, f"ceco.arms=['{arm}']", "train.lr_schedule='cosine'",
              "ceco.preview=0", "ceco.test_per_group=150"]
    if setting == "centralised":
        base = load_scenario("ceco-segmentation", [*common, "run.strategies=['fedavg']"], seed=seed)
        sc, _ = baseline_runs(base)["centralised"]
        sc["run"]["rounds"] = args.central_rounds
        sc["train"]["local_steps"] = args.central_steps
        return sc
    strategy = "clustered-fedavg" if setting == "clustered" else "fedavg"
    return load_scenario("ceco-segmentation", [*common, f"run.strategies=['{strategy}']",
                                               f"run.rounds={args.fed_rounds}",
                                               f"train.local_steps={args.fed_steps}"], seed=seed)


def one_run(sc: dict) -> dict:
    strategy = sc["run"]["strategies"][0]
    arm = sc["ceco"]["arms"][0]
    t0 = time.perf_counter()
    rows = Reference(sc).run(strategy, variant=arm, keep_models=False)
    last = rows[-1]
    tail_from = max(1, int(round(0.8 * (len(rows) - 1))))
    out = {m: last.get(m) for m in ("miou", "tail_iou", "etf_closeness", "etf_distance", "ari",
                                    *(f"iou_{c}" for c in CLASSES))}
    out.update(seconds=time.perf_counter() - t0,
               miou_last_fifth=last["miou"] - rows[tail_from]["miou"],
               curve={m: [r.get(m) for r in rows] for m in ("miou", "tail_iou", "etf_closeness", "etf_distance")})
    return out


def run(args: argparse.Namespace) -> dict:
    path = OUT / (f"ceco-{args.tag}.json" if args.tag else "ceco.json")
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("settings", {})
    results["settings"].update(central=[args.central_rounds, args.central_steps],
                               federated=[args.fed_rounds, args.fed_steps])
    runs = results.setdefault("runs", {})
    settings = args.settings + (["clustered"] if args.clustered and "clustered" not in args.settings else [])
    for name in args.regimes:
        data, ceco = regime(name)
        imbalance = data_key(name)
        for seed in args.seeds:
            for setting in settings:
                for arm in args.arms:
                    # CE and weighted CE do not depend on lambda / temperature: one run per imbalance
                    key = f"{imbalance if arm != 'ceco' else name}/{setting}/{arm}/{seed}"
                    if key in runs:
                        continue
                    r = one_run(scenario(seed, data, ceco if arm == "ceco" else [], arm, setting, args))
                    runs[key] = r
                    print(key, f"miou {r['miou']:.3f} tail {r['tail_iou']:.3f} close {r['etf_closeness']:.3f} "
                          f"dist {r['etf_distance']:.3f} ({r['seconds']:.0f} s)", flush=True)
                    OUT.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(results, indent=1))
    if args.flower:
        results["speed"] = flower_timing()
        path.write_text(json.dumps(results, indent=1))
    return results


def flower_timing() -> dict:
    """s/round of the built-in scenario's FedAvg CeCo arm through Flower (simulation engine on
    Ray) and through the in-process engine, on the same federation and seed."""
    scenario = load_scenario("ceco-segmentation", ["ceco.arms=['ceco']", "run.strategies=['fedavg']", "ceco.baselines=[]"])
    speed = flower_against_in_process(scenario, "fedavg", "ceco", "miou")
    speed["same_final_miou"] = speed.pop("same_final")
    return speed


# ---- tables ------------------------------------------------------------------------------------


def _ms(v: np.ndarray) -> str:
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"


def tables(results: dict) -> str:
    runs = results["runs"]
    lines = []
    regimes = sorted({k.split("/")[0] for k in runs if k.split("/")[2] == "ceco"})
    for name in regimes:
        imbalance = data_key(name)
        for setting in ("centralised", "fedavg", "clustered"):
            seeds = sorted(int(k.split("/")[3]) for k in runs if k.startswith(f"{name}/{setting}/ceco/"))
            seeds = [s for s in seeds if all(f"{imbalance}/{setting}/{a}/{s}" in runs for a in ("ce", "weighted-ce"))]
            if not seeds:
                continue
            get = {"ce": lambda s, m: runs[f"{imbalance}/{setting}/ce/{s}"][m],
                   "weighted-ce": lambda s, m: runs[f"{imbalance}/{setting}/weighted-ce/{s}"][m],
                   "ceco": lambda s, m: runs[f"{name}/{setting}/ceco/{s}"][m]}
            lines += [f"\n#### {name}, {setting} (seeds {', '.join(map(str, seeds))})\n",
                      "| arm | mIoU | tail IoU | diamond | ring | ETF closeness | CeCo-branch distance to ETF | "
                      "mIoU change, last fifth |", "|---|---|---|---|---|---|---|---|"]
            for arm in ("ce", "weighted-ce", "ceco"):
                col = {m: np.array([get[arm](s, m) for s in seeds], float)
                       for m in ("miou", "tail_iou", "iou_diamond", "iou_ring", "etf_closeness", "etf_distance",
                                 "miou_last_fifth")}
                lines.append(f"| {arm} | {_ms(col['miou'])} | {_ms(col['tail_iou'])} | {_ms(col['iou_diamond'])} | "
                             f"{_ms(col['iou_ring'])} | {np.mean(col['etf_closeness']):.3f} ± "
                             f"{np.std(col['etf_closeness']):.3f} | {np.mean(col['etf_distance']):.2f} | "
                             f"{_ms(col['miou_last_fifth'])} |")
            lines += ["", "| CeCo against | Δ tail IoU (paired) | worst, best seed | baseline tail spread | "
                      "Δ mIoU (paired) | worst, best seed | baseline mIoU spread | tail lifted, mIoU kept |",
                      "|---|---|---|---|---|---|---|---|"]
            for base in ("ce", "weighted-ce"):
                dt = np.array([get["ceco"](s, "tail_iou") - get[base](s, "tail_iou") for s in seeds])
                dm = np.array([get["ceco"](s, "miou") - get[base](s, "miou") for s in seeds])
                st = np.std([get[base](s, "tail_iou") for s in seeds])
                sm = np.std([get[base](s, "miou") for s in seeds])
                verdict = "yes" if dt.mean() > st and dm.mean() > -sm else "no"
                lines.append(f"| {base} | {_ms(dt)} | {100 * dt.min():+.1f}, {100 * dt.max():+.1f} | {100 * st:.1f} | "
                             f"{_ms(dm)} | {100 * dm.min():+.1f}, {100 * dm.max():+.1f} | {100 * sm:.1f} | {verdict} |")
    lines += per_group_table(runs)
    if "speed" in results:
        s = results["speed"]
        lines.append(f"\nSpeed (the scenario's FedAvg CeCo arm): {s['flower_s_per_round']:.2f} s/round through Flower, "
                     f"{s['in_process_s_per_round']:.2f} s/round in-process (same final mIoU: {s['same_final_miou']})")
    return "\n".join(lines)


def per_group_table(runs: dict) -> list[str]:
    """Clustered FedAvg (a model per found group) against FedAvg, per regime and arm, paired over
    the seeds both ran: do per-group models lift the tail classes?"""
    lines = []
    pairs = sorted({(k.split("/")[0], k.split("/")[2]) for k in runs if k.split("/")[1] == "clustered"})
    for name, arm in pairs:
        seeds = sorted(int(k.split("/")[3]) for k in runs if k.startswith(f"{name}/clustered/{arm}/")
                       and f"{name}/fedavg/{arm}/{k.split('/')[3]}" in runs)
        if not seeds:
            continue
        if not lines:
            lines += ["\n#### Per-group models: clustered FedAvg against FedAvg\n",
                      "| regime, arm | seeds | FedAvg mIoU | clustered mIoU | FedAvg tail | clustered tail | "
                      "Δ tail (paired; worst, best) | Δ mIoU (paired) | ARI (final) |", "|---|---|---|---|---|---|---|---|---|"]
        fed = {m: np.array([runs[f"{name}/fedavg/{arm}/{s}"][m] for s in seeds], float) for m in ("miou", "tail_iou")}
        clu = {m: np.array([runs[f"{name}/clustered/{arm}/{s}"][m] for s in seeds], float) for m in ("miou", "tail_iou")}
        ari = [runs[f"{name}/clustered/{arm}/{s}"].get("ari") for s in seeds]
        dt, dm = clu["tail_iou"] - fed["tail_iou"], clu["miou"] - fed["miou"]
        lines.append(f"| {name}, {arm} | {', '.join(map(str, seeds))} | {_ms(fed['miou'])} | {_ms(clu['miou'])} | "
                     f"{_ms(fed['tail_iou'])} | {_ms(clu['tail_iou'])} | {_ms(dt)} ({100 * dt.min():+.1f}, "
                     f"{100 * dt.max():+.1f}) | {_ms(dm)} | {', '.join('-' if a is None else f'{a:.2f}' for a in ari)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--regimes", default="mild,mild-l0.1-t0.5,severe")
    p.add_argument("--central-rounds", type=int, default=16)
    p.add_argument("--central-steps", type=int, default=100)
    p.add_argument("--fed-rounds", type=int, default=20)
    p.add_argument("--fed-steps", type=int, default=20)
    p.add_argument("--settings", default="centralised,fedavg", help="some of centralised, fedavg, clustered")
    p.add_argument("--clustered", action="store_true")
    p.add_argument("--arms", default="ce,weighted-ce,ceco", help="some of ce, weighted-ce, ceco")
    p.add_argument("--flower", action="store_true")
    p.add_argument("--tables", action="store_true", help="print the tables of the saved JSON and stop")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.regimes = [r for r in args.regimes.split(",") if r]
    args.settings = [s for s in args.settings.split(",") if s]
    args.arms = [a for a in args.arms.split(",") if a]
    torch.set_num_threads(1)
    if args.tables:
        path = OUT / (f"ceco-{args.tag}.json" if args.tag else "ceco.json")
        print(tables(json.loads(path.read_text())))
        return
    print(tables(run(args)))


if __name__ == "__main__":
    main()
