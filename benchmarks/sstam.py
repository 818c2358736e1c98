"""SSTAM on compressed video: the detectors, the combined score across unseen contents, the
temporal model, and the federation against centralised training.

    python benchmarks/sstam.py                 # all parts (about 10 minutes on one core, the set cached)
    python benchmarks/sstam.py --parts loco    # one part: directions, loco, federated, speed

- ``directions``: each detector's mean Spearman rho with the compression level per ladder,
  deblocking off against on, and the temporal detectors' AUC on the generator's labels
  (attention model against the classical detectors): the scenario's data tables.
- ``loco``: leave-one-content-out. For each of the 16 contents, the regressor of each arm
  (the workload's own local training, ``--steps`` Adam steps) is trained on the other 15
  and predicts the held-out one's encodes; pooled SRCC and PLCC over all encodes against
  SSIM, the mean and minimum SRCC within each (content, ladder), and the pooled SRCC's
  spread over ``--subsets`` random 12-of-16 content subsets (the spec's classical baseline:
  0.48 with saliency, over 8 contents). Paired: every arm sees the same folds and seeds.
- ``federated``: the scenario's FedAvg and clustered FedAvg against the centralised arm on
  each of the 4 folds of contents (the in-process engine), SSTAM arm: final SRCC per fold,
  the per-codec SRCC and the clustered arm's ARI.
- ``speed``: s/round of the scenario's FedAvg arm through Flower's simulation engine against
  the in-process engine.

Writes ``benchmarks/results/sstam.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import pearsonr, spearmanr  # noqa: E402

from server.run_config import client_view  # noqa: E402
from simulations.reference import Reference, flower_against_in_process  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.base import TrainSettings, stack_params  # noqa: E402
from workloads.sstam import ARMS, SSTAMVideo, VideoCohort, ssim_logit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def workload(overrides: list[str]) -> tuple[dict, SSTAMVideo]:
    scenario = load_scenario("sstam-video", overrides)
    return scenario, SSTAMVideo(client_view(scenario))


def directions(wl: SSTAMVideo) -> dict:
    tables = wl.data_tables()
    for t in tables:
        print(f"\n{t['title']}")
        if t["header"]:
            print(" | ".join(t["header"]))
            for row in t["rows"]:
                print(" | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row))
    return {"tables": tables, "metrics": wl.data_metrics}


def loco(wl: SSTAMVideo, steps: int, subsets: int, seeds: list[int]) -> dict:
    d = wl.dataset
    contents = np.unique(d.content)
    rng = np.random.default_rng(0)
    draws = [rng.choice(contents, 12, replace=False) for _ in range(subsets)]
    out = {}
    for arm in ARMS:
        per_seed = []
        for seed in seeds:
            pred = np.zeros(len(d.ssim))
            for k in contents:
                train, test = np.flatnonzero(d.content != k), np.flatnonzero(d.content == k)
                cohort = VideoCohort(client_ids=np.array([0]), features=d.features[train], ssim=d.ssim[train],
                                     starts=np.array([0, len(train)]))
                start = stack_params(wl._draw(seed, 0), 1)
                trained = wl.local_train(start, cohort, TrainSettings(local_steps=steps, lr=0.01, server_round=seed + 1,
                                                                      variant=arm))
                pred[test] = wl.predict({n: v[0] for n, v in trained.items()}, d.features[test])
            within = [spearmanr(pred[at], d.ssim[at]).statistic for at in
                      ((d.content == c) & (d.ladder == l) for c in contents for l in np.unique(d.ladder))]
            subs = [spearmanr(pred[np.isin(d.content, s)], d.ssim[np.isin(d.content, s)]).statistic for s in draws]
            per_seed.append({"pooled": float(spearmanr(pred, d.ssim).statistic),
                             "plcc": float(pearsonr(pred, ssim_logit(d.ssim)).statistic),
                             "within_mean": float(np.nanmean(within)), "within_min": float(np.nanmin(within)),
                             "subset_sd": float(np.std(subs)), "subset_lo": float(np.min(subs)),
                             "subset_hi": float(np.max(subs))})
        out[arm] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
        out[arm]["pooled_seed_sd"] = float(np.std([r["pooled"] for r in per_seed]))
        out[arm]["per_seed"] = per_seed
    print("\narm | pooled SRCC (seed sd) | 12-of-16 subsets sd [range] | PLCC | within-ladder mean / min")
    for arm, r in out.items():
        print(f"{arm} | {r['pooled']:.3f} ({r['pooled_seed_sd']:.3f}) | {r['subset_sd']:.3f} "
              f"[{r['subset_lo']:.2f}, {r['subset_hi']:.2f}] | {r['plcc']:.3f} | {r['within_mean']:.3f} / "
              f"{r['within_min']:.2f}")
    return out


def federated(rounds: int) -> dict:
    out: dict = {}
    for fold in range(4):
        scenario = load_scenario("sstam-video", [f"sstam.fold={fold}", "sstam.arms=['sstam']", f"run.rounds={rounds}"])
        ref = Reference(scenario)
        row = {}
        for strategy in ("fedavg", "clustered-fedavg"):
            last = ref.run(strategy, variant="sstam", keep_models=False)[-1]
            row[strategy] = {k: last.get(k) for k in ("srcc", "srcc_within", "srcc_h264", "srcc_mpeg2", "ari")}
        base = SSTAMVideo.baselines(scenario)["centralised"]
        overrides = [f"{section}.{k}={json.dumps(v)}" for section, table in base.items() for k, v in table.items()
                     if (section, k) != ("train", "proximal_mu")]  # FedAvg already: 0 is the default
        central = load_scenario("sstam-video", [f"sstam.fold={fold}", "sstam.arms=['sstam']", f"run.rounds={rounds}",
                                                "sstam.baselines=[]", *overrides])
        last = Reference(central).run("fedavg", variant="sstam", keep_models=False)[-1]
        row["centralised"] = {k: last.get(k) for k in ("srcc", "srcc_within", "srcc_h264", "srcc_mpeg2")}
        out[fold] = row
    print("\nfold | FedAvg SRCC | clustered SRCC (ARI) | centralised SRCC | FedAvg - centralised")
    for fold, row in out.items():
        print(f"{fold} | {row['fedavg']['srcc']:.3f} | {row['clustered-fedavg']['srcc']:.3f} "
              f"({row['clustered-fedavg']['ari']:.2f}) | {row['centralised']['srcc']:.3f} | "
              f"{row['fedavg']['srcc'] - row['centralised']['srcc']:+.3f}")
    gaps = [row["fedavg"]["srcc"] - row["centralised"]["srcc"] for row in out.values()]
    print(f"mean FedAvg - centralised: {np.mean(gaps):+.3f} ± {np.std(gaps):.3f}")
    return {"folds": out, "gap_mean": float(np.mean(gaps)), "gap_sd": float(np.std(gaps))}


def speed() -> dict:
    scenario = load_scenario("sstam-video", ["sstam.arms=['sstam']", "sstam.baselines=[]", "run.rounds=10"])
    out = flower_against_in_process(scenario, "fedavg", "sstam", "srcc")
    print(f"\nspeed: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="directions,loco,federated,speed")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of each leave-one-content-out fit")
    parser.add_argument("--seeds", default="0,1,2", help="regressor seeds of the leave-one-content-out fits")
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the federated part")
    args = parser.parse_args()
    parts = args.parts.split(",")
    started = time.time()
    _, wl = workload([])
    results: dict = {}
    if "directions" in parts:
        results["directions"] = directions(wl)
    if "loco" in parts:
        results["loco"] = loco(wl, args.steps, args.subsets, [int(s) for s in args.seeds.split(",")])
    if "federated" in parts:
        results["federated"] = federated(args.rounds)
    if "speed" in parts:
        results["speed"] = speed()
    results["seconds"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"sstam-{'-'.join(parts)}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{time.time() - started:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
