"""SSTAM on compressed video: the detectors, the combined score across unseen contents, the
temporal model, and the federation against centralised training.

    python benchmarks/sstam.py                 # all parts (about 10 minutes on one core, the set cached)
    python benchmarks/sstam.py --parts loco    # one part: directions, loco, federated, speed

- ``directions``: each detector's mean Spearman rho with the compression level per ladder,
  deblocking off against on, and the temporal detectors' AUC on the generator's labels
  (attention model against the classical detectors): the scenario's data tables.
- ``loco``: leave-one-content-out. For each content (16 by default), the regressor of each arm
  (the workload's own local training: ``--steps`` Adam steps at ``--lr``) is trained on the other 15
  and predicts the held-out one's encodes; pooled SRCC and PLCC over all encodes against
  SSIM, the mean and minimum SRCC within each (content, ladder), and the pooled SRCC's
  spread over ``--subsets`` random subsets of three quarters of the contents (12 of 16; the
  spec's classical baseline: 0.48 with saliency, over 8 contents). Paired: every arm sees the same folds and seeds.
- ``federated``: the scenario's FedAvg and clustered FedAvg against the centralised arm, the
  SSTAM arm, 4-fold cross-validated over contents (the in-process engine): each fold's test
  encodes predicted by the models trained without it, pooled over all contents; per
  codec, and the clustered arm's ARI; for each federation seed.
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


def loco(wl: SSTAMVideo, steps: int, lr: float, subsets: int, seeds: list[int]) -> dict:
    d = wl.dataset
    contents = np.unique(d.content)
    rng = np.random.default_rng(0)
    draws = [rng.choice(contents, 3 * len(contents) // 4, replace=False) for _ in range(subsets)]
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
                trained = wl.local_train(start, cohort, TrainSettings(local_steps=steps, lr=lr, server_round=seed + 1,
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
    print(f"\narm | pooled SRCC (seed sd) | {3 * len(contents) // 4}-of-{len(contents)} subsets sd [range] | PLCC | "
          "within-ladder mean / min")
    for arm, r in out.items():
        print(f"{arm} | {r['pooled']:.3f} ({r['pooled_seed_sd']:.3f}) | {r['subset_sd']:.3f} "
              f"[{r['subset_lo']:.2f}, {r['subset_hi']:.2f}] | {r['plcc']:.3f} | {r['within_mean']:.3f} / "
              f"{r['within_min']:.2f}")
    return out


def federated(rounds: int, seeds: list[int], overrides: list[str]) -> dict:
    """4-fold cross-validation over contents: each fold's test encodes are predicted by the
    models trained on the other three folds, and the predictions of all contents are
    pooled (one fold's 4 contents alone swing the SRCC by tenths)."""
    arms = {"fedavg": "fedavg", "clustered-fedavg": "clustered-fedavg", "centralised": "fedavg"}
    out: dict = {name: [] for name in arms}
    for seed in seeds:
        pred = {name: None for name in arms}
        aris: dict = {name: [] for name in arms}
        for fold in range(4):
            common = [*overrides, f"sstam.fold={fold}", "sstam.arms=['sstam']", f"run.rounds={rounds}",
                      "sstam.baselines=[]"]
            scenario = load_scenario("sstam-video", common, seed=seed)
            base = SSTAMVideo.baselines(load_scenario("sstam-video", common[:-1], seed=seed))["centralised"]
            pooled = [f"{section}.{k}={json.dumps(v)}" for section, table in base.items() for k, v in table.items()
                      if (section, k) != ("train", "proximal_mu")]  # FedAvg already: 0 is the default
            central = load_scenario("sstam-video", [*common, *pooled], seed=seed)
            for name, strategy in arms.items():
                sc = central if name == "centralised" else scenario
                wl = SSTAMVideo(client_view(sc))
                last = Reference(sc).run(strategy, variant="sstam")[-1]
                if pred[name] is None:
                    pred[name] = np.zeros(len(wl.dataset.ssim))
                pred[name][wl.test_rows] = wl.test_predictions(last["models"])
                if last.get("ari") is not None:
                    aris[name].append(last["ari"])
        d = wl.dataset
        for name in arms:
            p = pred[name]
            within = [spearmanr(p[at], d.ssim[at]).statistic for at in
                      ((d.content == c) & (d.ladder == l) for c in np.unique(d.content) for l in np.unique(d.ladder))]
            out[name].append({"pooled": float(spearmanr(p, d.ssim).statistic), "within": float(np.nanmean(within)),
                              **{f"pooled_{codec}": float(spearmanr(p[d.codec == g], d.ssim[d.codec == g]).statistic)
                                 for g, codec in enumerate(("h264", "mpeg2"))},
                              "ari": float(np.mean(aris[name])) if aris[name] else None})
    print("\nstrategy | pooled SRCC, 4-fold CV (per seed) | within-ladder | H.264 | MPEG-2 | ARI")
    for name, runs in out.items():
        ari = [r["ari"] for r in runs if r["ari"] is not None]
        seeds = ", ".join(format(r["pooled"], ".3f") for r in runs)
        print(f"{name} | {np.mean([r['pooled'] for r in runs]):.3f} ({seeds})"
              f" | {np.mean([r['within'] for r in runs]):.3f} | {np.mean([r['pooled_h264'] for r in runs]):.3f} | "
              f"{np.mean([r['pooled_mpeg2'] for r in runs]):.3f} | {np.mean(ari) if ari else float('nan'):.2f}")
    gaps = [f["pooled"] - c["pooled"] for f, c in zip(out["fedavg"], out["centralised"])]
    print(f"FedAvg - centralised (paired by seed): {np.mean(gaps):+.3f} ± {np.std(gaps):.3f}")
    return {"runs": out, "gap_mean": float(np.mean(gaps)), "gap_sd": float(np.std(gaps))}


def speed() -> dict:
    scenario = load_scenario("sstam-video", ["sstam.arms=['sstam']", "sstam.baselines=[]", "run.rounds=10"])
    out = flower_against_in_process(scenario, "fedavg", "sstam", "srcc")
    print(f"\nspeed: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="directions,loco,federated,speed")
    parser.add_argument("--steps", type=int, default=600, help="Adam steps of each leave-one-content-out fit")
    parser.add_argument("--lr", type=float, default=0.05, help="their step size (the scenario's train.lr)")
    parser.add_argument("--set", action="append", default=[], help="scenario overrides (e.g. sstam.hidden=16)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the regressor (loco) and of the federation")
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=100, help="rounds of the federated part (the scenario's)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    started = time.time()
    _, wl = workload(args.set)
    results: dict = {}
    if "directions" in parts:
        results["directions"] = directions(wl)
    if "loco" in parts:
        results["loco"] = loco(wl, args.steps, args.lr, args.subsets, [int(s) for s in args.seeds.split(",")])
    if "federated" in parts:
        results["federated"] = federated(args.rounds, [int(x) for x in args.seeds.split(",")], args.set)
    if "speed" in parts:
        results["speed"] = speed()
    results["seconds"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"sstam-{'-'.join(parts)}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{time.time() - started:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
