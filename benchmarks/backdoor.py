"""Backdoors through dataset distillation: attack success and clean accuracy, with and
without each defense, on several seeds.

1. ``single``: the paper's threat model. One distiller holds the whole training split and
   the victim trains on its synthetic set alone (ipc 10, 2% poisoned, as the spec's pilot).
2. ``federated``: the ``backdoor-doorping`` scenario's federation (10 clients, client 0
   malicious, ipc 5 each, 30% of its shard poisoned), distilled as in a 4-round run
   (12 DC iterations), in one process (``workloads.backdoor.experiment``: the workload code
   of the Flower run; the honest clients are distilled once for all arms). Synthetic
   uploads: the server's model on the union, then each defense (upload inspection with
   retraining on the kept uploads, Neural Cleanse, fine-pruning). Weight uploads: every
   client trains the global model on its synthetic set for ``--weight-rounds`` rounds,
   aggregated by FedAvg and Flower's robust aggregators (the same strategy classes as the
   Flower run).
3. ``--trigger-sizes``: the federated attacks again with a larger trigger.

Usage: python benchmarks/backdoor.py [--seeds 0,1,2] [--parts single,federated] [--trigger-sizes 2,4]
Writes ``benchmarks/results/backdoor.json``; prints Markdown tables (mean and range over seeds).
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

from server.run_config import resolve  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.backdoor import CLEAN, BackdoorDistillation  # noqa: E402
from workloads.backdoor.experiment import (  # noqa: E402
    Uploads, arms, distil, evaluate_arm, load_uploads, merge, save_uploads, with_attack,
)
from workloads.backdoor.model import accuracy, attack_success, fresh, train_full_batch  # noqa: E402

OUT = Path(__file__).parent / "results"
AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedavg-clip")
ATTACKS = ("naive", "doorping")


def single(seed: int, iterations: int) -> dict:
    """The paper's setting: one distiller, the victim trains on its synthetic set alone."""
    scenario = load_scenario("backdoor-doorping", [
        "federation.clients=1", "backdoor.ipc=10", "backdoor.portion=0.02", "backdoor.server_epochs=300",
        "backdoor.server_lr=0.01", f"backdoor.iterations_per_round={iterations}"], seed=seed)
    out = {}
    for attack in (CLEAN, *ATTACKS):
        wl = BackdoorDistillation(with_attack(scenario, "doorping" if attack == CLEAN else attack))
        start = time.perf_counter()
        up = distil(wl, [0], attack, 1)
        seconds = time.perf_counter() - start
        out[attack] = {"trigger": up.trigger, "uploads": up, "distil_s": seconds}
    rows = {}
    for attack in (CLEAN, *ATTACKS):
        wl = BackdoorDistillation(scenario)
        trigger = out[attack]["trigger"] if attack != CLEAN else out["doorping"]["trigger"]
        wl.trigger = trigger * wl.mask
        x, y = wl.test
        triggered = wl.triggered_test()
        scores = []
        for init in range(3):  # the paper's protocol: several victim initialisations
            net = train_full_batch(fresh(1000 + init), *out[attack]["uploads"].union()[:2], 300, 0.01)
            scores.append((accuracy(net, x, y), attack_success(net, triggered, y, 0)))
        cta, asr = np.mean(scores, axis=0)
        rows[attack] = {"cta": float(cta), "asr": float(asr), "distil_s": out[attack]["distil_s"]}
    return rows


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
        row = {"cta": history[-1]["cta"], "asr": history[-1]["asr"]}
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
    start = time.perf_counter()
    saved = OUT / f"backdoor_uploads_seed{seed}_size2.npz"
    uploads = load_uploads(saved) if reuse and saved.is_file() else arms(scenario, 1, ATTACKS)
    distil_s = time.perf_counter() - start
    honest = Uploads({c: v for c, v in uploads[CLEAN].images.items() if c != 0},
                     {c: v for c, v in uploads[CLEAN].labels.items() if c != 0})
    out = {"distil_s": distil_s, "sizes": {}}
    for size in trigger_sizes:
        sized = scenario if size == 2 else {**scenario, "backdoor": {**scenario["backdoor"], "trigger_size": size}}
        saved = OUT / f"backdoor_uploads_seed{seed}_size{size}.npz"
        if size != 2 and reuse and saved.is_file():
            uploads = load_uploads(saved)
        elif size != 2:  # only the attacker's distillation depends on the trigger
            for attack in ATTACKS:
                wl = BackdoorDistillation(with_attack(sized, attack))
                uploads[attack] = merge(honest, distil(wl, [0], attack, 1))
        save_uploads(uploads, saved)
        result = {}
        for arm in (CLEAN, *ATTACKS):
            wl = BackdoorDistillation(with_attack(sized, arm if arm != CLEAN else "doorping"))
            trigger = uploads[arm].trigger if arm != CLEAN else uploads["doorping"].trigger
            malicious = set() if arm == CLEAN else {0}
            t0 = time.perf_counter()
            result[arm] = {"union": evaluate_arm(wl, uploads[arm], trigger, malicious, round_=4)}
            if size == 2:
                result[arm]["weights"] = weight_rounds(sized, saved, arm, trigger, weight_rounds_n)
            result[arm]["seconds"] = time.perf_counter() - t0
            print(f"seed {seed} size {size} {arm}: " + json.dumps(result[arm]["union"]["none"]), flush=True)
        out["sizes"][str(size)] = result
    return out


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def tables(results: dict) -> str:
    seeds = list(results["seeds"])
    lines = []
    if "single" in results:
        lines += ["### One distiller, the victim trains on its synthetic set alone (the paper's setting)", "",
                  "| arm | CTA | ASR | distillation s |", "|---|---|---|---|"]
        for arm in (CLEAN, *ATTACKS):
            r = [results["single"][s][arm] for s in seeds]
            lines.append(f"| {arm} | {spread([x['cta'] for x in r])} | {spread([x['asr'] for x in r])} | "
                         f"{np.mean([x['distil_s'] for x in r]):.0f} |")
        lines.append("")
    if "federated" in results:
        for size in results["federated"][seeds[0]]["sizes"]:
            lines += [f"### Ten clients, one malicious, synthetic uploads (data-union), trigger {size}x{size}", "",
                      "| arm | defense | CTA | ASR | TPR | FPR | detail |", "|---|---|---|---|---|---|---|"]
            for arm in (CLEAN, *ATTACKS):
                per = [results["federated"][s]["sizes"][size][arm]["union"] for s in seeds]
                for defense in per[0]:
                    r = [p[defense] for p in per]
                    detail = ""
                    if defense == "neural-cleanse":
                        detail = (f"anomaly {spread([x['anomaly'] for x in r])}; target named "
                                  f"{sum(bool(x['detected']) for x in r)}/{len(r)}")
                    lines.append(f"| {arm} | {defense} | {spread([x['cta'] for x in r])} | "
                                 f"{spread([x['asr'] for x in r])} | {spread([x.get('tpr') for x in r])} | "
                                 f"{spread([x.get('fpr') for x in r])} | {detail} |")
            lines.append("")
        if "weights" in results["federated"][seeds[0]]["sizes"]["2"][CLEAN]:
            lines += ["### Ten clients, one malicious, weight uploads (trigger 2x2)", "",
                      "| arm | aggregator | CTA | ASR | TPR | FPR |", "|---|---|---|---|---|---|"]
            for arm in (CLEAN, *ATTACKS):
                per = [results["federated"][s]["sizes"]["2"][arm]["weights"] for s in seeds]
                for agg in per[0]:
                    r = [p[agg] for p in per]
                    key = "krum" if "krum" in agg else "clipping" if agg == "fedavg-clip" else None
                    tpr = spread([x.get(f"tpr_{key}") for x in r]) if key else "–"
                    fpr = spread([x.get(f"fpr_{key}") for x in r]) if key else "–"
                    lines.append(f"| {arm} | {agg} | {spread([x['cta'] for x in r])} | "
                                 f"{spread([x['asr'] for x in r])} | {tpr} | {fpr} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parts", default="single,federated")
    parser.add_argument("--trigger-sizes", default="2,4")
    parser.add_argument("--single-iterations", type=int, default=20)
    parser.add_argument("--weight-rounds", type=int, default=5)
    parser.add_argument("--reuse-uploads", action="store_true",
                        help="re-run only the server side on the uploads a previous run saved")
    parser.add_argument("--iterations", type=int, default=12, help="federated DC iterations (4 rounds x 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    sizes = [int(s) for s in args.trigger_sizes.split(",")]
    results: dict = {"seeds": [str(s) for s in seeds]}
    start = time.perf_counter()
    if "single" in parts:
        results["single"] = {str(s): single(s, args.single_iterations) for s in seeds}
    if "federated" in parts:
        results["federated"] = {str(s): federated(s, sizes, args.weight_rounds, args.iterations, args.reuse_uploads) for s in seeds}
    results["seconds"] = time.perf_counter() - start
    OUT.mkdir(exist_ok=True)
    path = OUT / "backdoor.json"
    if path.is_file():  # keep the parts not re-run this time
        earlier = json.loads(path.read_text())
        if earlier.get("seeds") == results["seeds"]:
            results = {**earlier, **results}
    path.write_text(json.dumps(results, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else None))
    print(tables(results))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
