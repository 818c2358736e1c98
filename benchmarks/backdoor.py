"""Backdoors through dataset distillation: attack success and clean accuracy, with and
without each defense, on several seeds.

1. ``single``: the paper's threat model. One distiller holds the whole training split and
   the victim trains on its synthetic set alone (ipc 10, 2% poisoned, as the spec's pilot;
   three victim initialisations per set).
2. ``federated``: the ``backdoor-doorping`` scenario's federation (10 clients, client 0
   malicious, ipc 5 each, 30% of its shard poisoned), distilled as in a 4-round run
   (12 DC iterations), in one process (``workloads.backdoor.experiment``: the workload code
   of the Flower run; the honest clients are distilled once for all arms). Synthetic
   uploads: the server's model on the union, then each defense (upload inspection with
   retraining on the kept uploads, the range check and range clipping, Neural Cleanse,
   fine-pruning). Weight uploads: every client trains the global model on its synthetic set
   for ``--weight-rounds`` rounds, aggregated by FedAvg and Flower's robust aggregators (the
   same strategy classes as the Flower run).
3. ``--trigger-sizes``: the federated attacks again with a larger trigger.

Arms: clean, NAIVEATTACK, DOORPING, DOORPING with its trigger clamped to the valid pixel range
(``doorping-clamped``), and NAIVEATTACK with DOORPING's final trigger from the start
(``naive-large``, the magnitude-matched control). Two ASRs: ``asr``, the paper's (triggered
test images of the other classes sent to the target) and ``asr_all``, the paper's code's (all
triggered test images, the target class's own included).

Usage: python benchmarks/backdoor.py [--seeds 0,1,2,3,4] [--single-seeds 0,1,2] [--workers 2]
       [--parts single,federated,trigger_alone] [--trigger-sizes 2,4] [--tables]
Writes ``benchmarks/results/backdoor.json``; prints Markdown tables (mean and range over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from server.run_config import resolve  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.backdoor import CLEAN, RANGE_MARGIN, BackdoorDistillation, defenses  # noqa: E402
from workloads.backdoor.experiment import (  # noqa: E402
    ATTACK_ARMS, ONE_DISTILLER, Uploads, arms, evaluate_arm, honest_part, load_uploads, save_uploads, victims,
)

OUT = Path(__file__).parent / "results"
AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedavg-clip")
ARMS = (CLEAN, *ATTACK_ARMS)
WEIGHT_ARMS = (CLEAN, "naive", "doorping")  # weight uploads: the attacks as the workload runs them
PARTS = ("single", "federated", "trigger_alone")
VICTIMS = 3  # the paper's protocol: several victim initialisations per synthetic set


def single(seed: int, iterations: int) -> dict:
    """The paper's setting: one distiller, the victim trains on its synthetic set alone."""
    start = time.perf_counter()
    scenario = load_scenario("backdoor-doorping", [*ONE_DISTILLER, f"backdoor.iterations_per_round={iterations}"],
                             seed=seed)
    uploads = arms(scenario, 1, ATTACK_ARMS)
    distil_s = time.perf_counter() - start
    wl = BackdoorDistillation(scenario)
    low, high = wl.bounds
    rows = {}
    for arm in ARMS:
        trigger = (uploads[arm].trigger if arm != CLEAN else uploads["doorping"].trigger) * wl.mask
        images, labels, owners = uploads[arm].union()
        clipped = victims(wl, defenses.clip_to_range(images, wl.bounds), labels, trigger, VICTIMS)
        flagged = defenses.out_of_range(images, owners, wl.bounds, margin=RANGE_MARGIN).clients
        rows[arm] = {**victims(wl, images, labels, trigger, VICTIMS),
                     "cta_range_clip": clipped["cta"], "asr_range_clip": clipped["asr"],
                     "range_check_flags": len(flagged) > 0,
                     "trigger_max": float(np.abs(trigger).max() / (high - low)),
                     "upload_excess": float(max(images.max() - high, low - images.min()) / (high - low))}
    return {"arms": rows, "distil_s": distil_s}


def weight_rounds(scenario: dict, saved: Path, arm: str, trigger: np.ndarray, rounds: int) -> dict:
    """Clients train the global model on their (saved, fixed) synthetic sets for ``rounds``
    rounds, aggregated by FedAvg and Flower's robust aggregators: the round engine over the
    in-process exchange (``simulations.reference``), the same code as a Flower run."""
    # Only CTA and ASR are read here: no model-level defenses (Neural Cleanse costs seconds).
    attack = "none" if arm == CLEAN else arm
    ref = Reference(resolve({
        **scenario,
        "run": {**scenario["run"], "workload": "workloads.backdoor.experiment:FixedUploads", "rounds": rounds,
                "strategies": list(AGGREGATORS), "monitor": ""},
        "backdoor": {**scenario["backdoor"], "attack": attack, "compare_clean": False, "upload": "weights",
                     "defenses": [], "uploads": str(saved), "uploads_arm": arm},
    }))
    ref.workload.trigger = trigger * ref.workload.mask  # the clean arm is scored with DOORPING's trigger
    malicious = set(ref.workload.malicious_clients(CLEAN if arm == CLEAN else arm).tolist())
    rows = {}
    for name in AGGREGATORS:
        history = ref.run(name, variant=CLEAN if arm == CLEAN else arm, keep_models=False)
        row = {"cta": history[-1]["cta"], "asr": history[-1]["asr"], "asr_all": history[-1]["asr_all"]}
        for defense in history[1].get("flagged", {}):  # detection rates over all rounds
            per_round = [r["flagged"][defense] for r in history[1:]]
            hits = sum(len(set(f) & malicious) for f in per_round)
            false = sum(len(set(f) - malicious) for f in per_round)
            row[f"tpr_{defense}"] = hits / (len(malicious) * rounds) if malicious else None
            row[f"fpr_{defense}"] = false / ((history[1]["clients"] - len(malicious)) * rounds)
        rows[name] = row
    return rows


def federated(seed: int, trigger_sizes: list[int], weight_rounds_n: int, iterations: int, reuse: bool) -> dict:
    scenario = load_scenario("backdoor-doorping", [f"backdoor.iterations_per_round={iterations}"], seed=seed)
    out: dict = {"sizes": {}}
    honest: Uploads | None = None
    for size in trigger_sizes:
        sized = {**scenario, "backdoor": {**scenario["backdoor"], "trigger_size": size}}
        saved = OUT / f"backdoor_uploads_seed{seed}_size{size}.npz"
        start = time.perf_counter()
        if reuse and saved.is_file():
            uploads = load_uploads(saved)
        else:  # the honest clients once; only the attacker's distillation depends on the trigger
            uploads = arms(sized, 1, ATTACK_ARMS, honest=honest)
            save_uploads(uploads, saved)
        honest = honest_part(uploads[CLEAN], {0})
        result: dict = {"distil_s": time.perf_counter() - start}
        for arm in ARMS:
            wl = BackdoorDistillation(sized)
            trigger = uploads[arm].trigger if arm != CLEAN else uploads["doorping"].trigger
            malicious = set() if arm == CLEAN else {0}
            t0 = time.perf_counter()
            result[arm] = {"union": evaluate_arm(wl, uploads[arm], trigger, malicious, round_=4)}
            if size == 2 and arm in WEIGHT_ARMS:
                result[arm]["weights"] = weight_rounds(sized, saved, arm, trigger, weight_rounds_n)
            result[arm]["seconds"] = time.perf_counter() - t0
            print(f"seed {seed} size {size} {arm}: " + json.dumps(result[arm]["union"]["none"]), flush=True)
        out["sizes"][str(size)] = result
    return out


def trigger_alone(seed: int, trigger_sizes: list[int], iterations: int) -> dict:
    """Each arm's trigger on the clean federation's model (from the uploads ``federated``
    saved): a trigger far outside the pixel range can drive a model that never saw it to the
    target class by its size alone, so an arm's ASR is a backdoor only where this stays low."""
    scenario = load_scenario("backdoor-doorping", [f"backdoor.iterations_per_round={iterations}"], seed=seed)
    out = {}
    for size in trigger_sizes:
        sized = {**scenario, "backdoor": {**scenario["backdoor"], "trigger_size": size, "defenses": []}}
        uploads = load_uploads(OUT / f"backdoor_uploads_seed{seed}_size{size}.npz")
        wl = BackdoorDistillation(sized)
        params, _ = wl.server_train(*uploads[CLEAN].union(), 4)  # the same model as the clean arm's "none"
        out[str(size)] = {}
        for arm in ATTACK_ARMS:
            wl.trigger = uploads[arm].trigger * wl.mask
            out[str(size)][arm] = wl.central_metrics({n: v[None] for n, v in params.items()})["asr"]
    return out


def spread(values: list, fmt: str = ".2f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def tables(results: dict) -> str:
    lines = []
    if "single" in results:
        seeds = sorted(results["single"])
        lines += [f"### One distiller, the victim trains on its synthetic set alone (the paper's setting; seeds "
                  f"{', '.join(seeds)})", "",
                  "| arm | CTA | ASR (paper) | ASR (code) | ASR, trigger clipped to range | trigger max / range "
                  "| range check flags the set | CTA, range-clipped set | ASR, range-clipped set |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            r = [results["single"][s]["arms"][arm] for s in seeds]
            lines.append(f"| {arm} | {spread([x['cta'] for x in r])} | {spread([x['asr'] for x in r])} | "
                         f"{spread([x['asr_all'] for x in r])} | {spread([x['asr_trigger_in_range'] for x in r])} | "
                         f"{spread([x['trigger_max'] for x in r], '.0f')} | "
                         f"{sum(bool(x['range_check_flags']) for x in r)}/{len(r)} | "
                         f"{spread([x['cta_range_clip'] for x in r])} | {spread([x['asr_range_clip'] for x in r])} |")
        lines.append("")
    if "federated" in results:
        seeds = sorted(results["federated"])
        first = results["federated"][seeds[0]]
        for size in first["sizes"]:
            lines += [f"### Ten clients, one malicious, synthetic uploads (data-union), trigger {size}x{size} "
                      f"(seeds {', '.join(seeds)})", "",
                      "| arm | defense | CTA | ASR (paper) | ASR (code) | ASR, trigger clipped to range "
                      "| ASR of the trigger on the clean model | backdoor planted | TPR | FPR | detail |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for arm in ARMS:
                per = [results["federated"][s]["sizes"][size][arm]["union"] for s in seeds]
                for defense in per[0]:
                    r = [p[defense] for p in per]
                    detail = ""
                    if defense == "neural-cleanse":
                        detail = (f"anomaly {spread([x['anomaly'] for x in r])}; target named "
                                  f"{sum(bool(x['detected']) for x in r)}/{len(r)}")
                    alone = [results.get("trigger_alone", {}).get(s, {}).get(size, {}).get(arm) for s in seeds]
                    planted = [a >= 0.5 and (c is None or c < 0.5) for a, c in zip([x["asr"] for x in r], alone)
                               if a is not None and arm != CLEAN]  # the clean arm: the trigger alone
                    lines.append(f"| {arm} | {defense} | {spread([x['cta'] for x in r])} | "
                                 f"{spread([x['asr'] for x in r])} | {spread([x.get('asr_all') for x in r])} | "
                                 f"{spread([x.get('asr_trigger_in_range') for x in r])} | "
                                 f"{spread(alone)} | {f'{sum(planted)}/{len(planted)}' if planted else '–'} | "
                                 f"{spread([x.get('tpr') for x in r])} | {spread([x.get('fpr') for x in r])} | "
                                 f"{detail} |")
            lines.append("")
        if "weights" in first["sizes"].get("2", {}).get(CLEAN, {}):
            lines += [f"### Ten clients, one malicious, weight uploads (trigger 2x2; seeds {', '.join(seeds)})", "",
                      "| arm | aggregator | CTA | ASR (paper) | ASR (code) | backdoor planted | TPR | FPR |",
                      "|---|---|---|---|---|---|---|---|"]
            for arm in WEIGHT_ARMS:
                per = [results["federated"][s]["sizes"]["2"][arm]["weights"] for s in seeds]
                clean = [results["federated"][s]["sizes"]["2"][CLEAN]["weights"] for s in seeds]
                for agg in per[0]:
                    r = [p[agg] for p in per]
                    # DOORPING's trigger alone: the clean arm's model under it (NAIVE's white patch
                    # stays in range and moves no clean model: the synthetic-upload table)
                    alone = [c[agg]["asr"] if arm == "doorping" else 0.0 for c in clean]
                    planted = (f"{sum(x['asr'] >= 0.5 and a < 0.5 for x, a in zip(r, alone))}/{len(r)}"
                               if arm != CLEAN else "–")
                    key = "krum" if "krum" in agg else "clipping" if agg == "fedavg-clip" else None
                    tpr = spread([x.get(f"tpr_{key}") for x in r]) if key else "–"
                    fpr = spread([x.get(f"fpr_{key}") for x in r]) if key else "–"
                    lines.append(f"| {arm} | {agg} | {spread([x['cta'] for x in r])} | "
                                 f"{spread([x['asr'] for x in r])} | {spread([x.get('asr_all') for x in r])} | "
                                 f"{planted} | {tpr} | {fpr} |")
            lines.append("")
    return "\n".join(lines)


def _one_thread() -> None:
    torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the federated part")
    parser.add_argument("--single-seeds", default="0,1,2", help="seeds of the one-distiller part")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--trigger-sizes", default="2,4")
    parser.add_argument("--single-iterations", type=int, default=20)
    parser.add_argument("--weight-rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="seeds run in this many processes")
    parser.add_argument("--tables", action="store_true", help="print the tables of the saved results and stop")
    parser.add_argument("--reuse-uploads", action="store_true",
                        help="re-run only the server side on the uploads a previous run saved")
    parser.add_argument("--iterations", type=int, default=12, help="federated DC iterations (4 rounds x 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = OUT / "backdoor.json"
    if args.tables:
        print(tables(json.loads(path.read_text())))
        return
    parts = args.parts.split(",")
    sizes = [int(s) for s in args.trigger_sizes.split(",")]
    start = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    jobs = []  # (part, seed, function, args)
    if "single" in parts:
        jobs += [("single", s, single, (int(s), args.single_iterations)) for s in args.single_seeds.split(",")]
    if "federated" in parts:
        jobs += [("federated", s, federated, (int(s), sizes, args.weight_rounds, args.iterations, args.reuse_uploads))
                 for s in args.seeds.split(",")]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = [(part, seed, pool.submit(fn, *fn_args)) for part, seed, fn, fn_args in jobs]
        results: dict = {}
        for part, seed, future in futures:
            results.setdefault(part, {})[seed] = future.result()
    if "trigger_alone" in parts:  # cheap, and only once "federated" has saved the uploads it reads
        results["trigger_alone"] = {s: trigger_alone(int(s), sizes, args.iterations) for s in args.seeds.split(",")}
    results["seconds"] = time.perf_counter() - start
    if path.is_file():  # keep the parts not re-run this time
        earlier = json.loads(path.read_text())
        results = {**{k: v for k, v in earlier.items() if k in PARTS}, **results}
    path.write_text(json.dumps(results, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else None))
    print(tables(results))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
