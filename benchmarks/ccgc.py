"""CCGC graph clustering, federated: CCGC against the baselines that could embarrass it.

For every setting and seed, the ``ccgc-clustering`` federation (FedAvg over the clients'
encoders and federated k-means centres) through the round engine in one process (the same
code as the Flower run, which a test checks), and its reference runs: k-means on the raw
features, on the clients' own smoothed features (pooled), on features smoothed over the
whole graph, spectral clustering on the whole graph, CCGC trained centrally on the whole
graph, and the federated code with one client holding the whole graph. Final round only
(no best-epoch selection with labels).

Settings: the scenario (8 random subgraphs of a degree-80 CSBM: mean degree 10 inside each
client), the same with disjoint classes (each client holds 2 of the 4), and the scenario at
degree 10 with homophily 0.7, the spec's measured setting, where each client keeps an eighth
of the edges. ``--flower`` also times the scenario through Flower (s/round) against the
in-process engine.

Usage: python benchmarks/ccgc.py [--seeds 0,1,2,3,4] [--settings scenario,disjoint,sparse] [--flower] [--tables]
(``--settings "" --flower`` adds only the Flower timing to the saved results)
Writes ``benchmarks/results/ccgc.json``; prints Markdown tables (mean ± std over seeds).
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

from simulations.launcher import baseline_runs  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.ccgc import BASELINES  # noqa: E402

OUT = Path(__file__).parent / "results"
SETTINGS = {
    "scenario": [],
    "disjoint": ["ccgc.partition=disjoint-classes", "ccgc.classes_per_client=2"],
    "sparse": ["ccgc.degree=10", "ccgc.homophily=0.7"],
}
METRICS = ("nmi", "acc", "node_ari", "f1")


def one_seed(setting: str, seed: int) -> dict:
    scenario = load_scenario("ccgc-clustering", [*SETTINGS[setting], f"ccgc.baselines={list(BASELINES)}"],
                             seed=seed)
    runs = {"federated CCGC": (scenario, "fedavg")}
    runs.update(baseline_runs(scenario))
    out = {}
    for name, (sc, strategy) in runs.items():
        start = time.perf_counter()
        rows = Reference(sc).run(strategy, keep_models=False)
        out[name] = {m: rows[-1][m] for m in METRICS}
        out[name]["seconds"] = time.perf_counter() - start
        if name == "federated CCGC":
            warm = sc["ccgc"]["warmup_rounds"]
            out[name]["nmi_after_warmup"] = rows[warm]["nmi"] if 0 < warm < len(rows) else None
            out[name]["refit_nmi"] = rows[-1].get("refit_nmi")
    print(setting, seed, {k: round(v["nmi"], 3) for k, v in out.items()}, flush=True)
    return out


def flower_timing() -> dict:
    """s/round of the scenario's federation through Flower (simulation engine on Ray) and
    through the in-process engine, on seed 0, without the reference runs."""
    from server.record import load_history
    from simulations.launcher import simulate

    scenario = load_scenario("ccgc-clustering", ["ccgc.baselines=[]"])
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_history(simulate(scenario, out=Path(tmp)))["strategies"]["fedavg"]
    flower = float(np.median([r["wall_time_s"] for r in rows if r["round"] >= 2]))
    start = time.perf_counter()
    local = Reference(scenario).run("fedavg", keep_models=False)
    in_process = (time.perf_counter() - start) / (len(local) - 1)
    return {"flower_s_per_round": flower, "in_process_s_per_round": in_process,
            "same_final_nmi": rows[-1]["nmi"] == local[-1]["nmi"]}


def tables(results: dict) -> str:
    lines = []
    for setting, per_seed in results["settings"].items():
        seeds = sorted(per_seed)
        lines += [f"#### {setting}: {' '.join(SETTINGS[setting]) or 'the scenario'} (seeds {', '.join(seeds)})", "",
                  "| method | NMI | ACC | ARI | F1 | NMI gap to CCGC | s |", "|---|---|---|---|---|---|---|"]
        ccgc = np.array([per_seed[s]["federated CCGC"]["nmi"] for s in seeds])
        for method in per_seed[seeds[0]]:
            cells = []
            for metric in METRICS:
                v = np.array([per_seed[s][method][metric] for s in seeds])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
            gap = ccgc - np.array([per_seed[s][method]["nmi"] for s in seeds])
            secs = np.mean([per_seed[s][method]["seconds"] for s in seeds])
            gap_cell = "–" if method == "federated CCGC" else f"{gap.mean():+.3f} ({gap.min():+.3f} to {gap.max():+.3f})"
            lines.append(f"| {method} | {' | '.join(cells)} | {gap_cell} | {secs:.1f} |")
        lines.append("")
    if "flower" in results:
        f = results["flower"]
        lines.append(f"Scenario through Flower: {f['flower_s_per_round']:.3f} s/round; in-process engine "
                     f"{f['in_process_s_per_round']:.3f} s/round; same final NMI: {f['same_final_nmi']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--flower", action="store_true", help="also time the scenario through Flower")
    parser.add_argument("--tables", action="store_true", help="print the tables of the saved results and stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = OUT / "ccgc.json"
    if args.tables:
        print(tables(json.loads(path.read_text())))
        return
    start = time.perf_counter()
    results: dict = {"settings": {}}
    for setting in filter(None, args.settings.split(",")):
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; expected some of {list(SETTINGS)}")
        results["settings"][setting] = {s: one_seed(setting, int(s)) for s in args.seeds.split(",")}
    if args.flower:
        results["flower"] = flower_timing()
    results["seconds"] = time.perf_counter() - start
    OUT.mkdir(exist_ok=True)
    if path.is_file():  # keep the settings (and the Flower timing) not re-run this time
        earlier = json.loads(path.read_text())
        results = {**earlier, **results, "settings": {**earlier.get("settings", {}), **results["settings"]}}
    path.write_text(json.dumps(results, indent=1))
    print(tables(results))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
