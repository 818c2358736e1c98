"""MGTAB bot and stance detection, federated: RGCN against the baselines that could embarrass it.

For every setting and seed, the ``mgtab-bots`` federation through the round engine in one
process (the same code as the Flower run, which a test checks): RGCN on all seven
relations under FedAvg, clustered FedAvg (anchor-models Phase 1) and IFCA; FedAvg with the
other models (MLP, GCN, GAT, the relation-attention model) and with RGCN on the best pair
of relations (followers + friends); and one client holding the whole graph with every edge
(``centralised-*``) for every model. Every arm reports the test scores of the round with
the best validation macro-F1 (mean of the two tasks).

Settings: the scenario (two behaviour groups: the communities' bots deviate in opposite
directions and swap the url / hashtag roles) and ``uniform`` (one behaviour group: the
paper's setting, every community alike). ``--speed`` times one training epoch of the
graph layers on the scenario's whole graph: the precomputed sparse adjacency against PyTorch
Geometric's ``GCNConv``, ``RGCNConv`` and ``FastRGCNConv``; ``--flower`` times the scenario
through Flower (s/round) against the in-process engine.

``--long SETTINGS`` trains the centralised MLP, best pair and RGCN-7 four times as long (600 epochs).

Usage: python benchmarks/mgtab.py [--seeds 0,1,2,3,4] [--settings scenario,uniform] [--long scenario] [--speed] [--flower]
       [--tables]
Writes ``benchmarks/results/mgtab.json``; prints Markdown tables (mean ± std over seeds,
paired differences with their worst and best seed).
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
from workloads.mgtab import BASELINES  # noqa: E402

OUT = Path(__file__).parent / "results"
SETTINGS = {
    "scenario": [],
    "uniform": ["mgtab.behaviour_groups=1", "anchors.count=1"],
}
STRATEGIES = {"scenario": ["fedavg", "clustered-fedavg", "ifca"], "uniform": ["fedavg"]}
METRICS = ("f1_bot", "acc_bot", "f1_stance", "acc_stance")
# paired claims: (label, arm a, arm b, what the spec or the issue asks)
PAIRS = (
    ("RGCN-7 - MLP, centralised", "centralised", "centralised-mlp", ">= 0.1"),
    ("RGCN-7 - MLP, FedAvg", "fedavg", "fedavg-mlp", ">= 0.1"),
    ("RGCN-7 - RGCN best pair, centralised", "centralised", "centralised-rgcn-best-pair", "> 0"),
    ("RGCN-7 - RGCN best pair, FedAvg", "fedavg", "fedavg-rgcn-best-pair", "> 0"),
    ("FedAvg - centralised (RGCN-7)", "fedavg", "centralised", ">= -0.03"),
    ("clustered FedAvg - centralised (RGCN-7)", "clustered-fedavg", "centralised", ">= -0.03"),
    ("clustered FedAvg - FedAvg (RGCN-7)", "clustered-fedavg", "fedavg", "> 0"),
)


def one_seed(setting: str, seed: int) -> dict:
    others = [b for b in BASELINES if b != "fedavg-rgcn" and b != "centralised-rgcn"]
    scenario = load_scenario("mgtab-bots", [*SETTINGS[setting], f"mgtab.baselines={others}"], seed=seed)
    runs = {s: (scenario, s) for s in STRATEGIES[setting]}
    runs.update(baseline_runs(scenario))
    out = {}
    for name, (sc, strategy) in runs.items():
        start = time.perf_counter()
        rows = Reference(sc).run(strategy, keep_models=False)
        out[name] = {m: rows[-1][m] for m in METRICS}
        out[name]["selected_age"] = rows[-1]["selected_age"]
        out[name]["ari"] = rows[-1].get("ari")
        out[name]["seconds"] = time.perf_counter() - start
    print(setting, seed, {k: round(v["f1_bot"], 3) for k, v in out.items()}, flush=True)
    return out


LONG = ("centralised-mlp", "centralised-rgcn-best-pair", "centralised")


def long_runs(setting: str, seed: int, factor: int = 4) -> dict:
    """The centralised MLP, best pair and RGCN-7 trained ``factor`` x as long (are the
    baselines merely undertrained at the scenario's 150 epochs?)."""
    scenario = load_scenario("mgtab-bots", [*SETTINGS[setting], f"mgtab.baselines={list(LONG)}"], seed=seed)
    out = {}
    for name, (sc, strategy) in baseline_runs(scenario).items():
        sc = {**sc, "run": {**sc["run"], "rounds": sc["run"]["rounds"] * factor}}
        rows = Reference(sc).run(strategy, keep_models=False)
        out[name] = {m: rows[-1][m] for m in METRICS}
        out[name]["selected_age"] = rows[-1]["selected_age"]
    print("long", setting, seed, {k: round(v["f1_bot"], 3) for k, v in out.items()}, flush=True)
    return out


def speed(repeats: int = 20) -> dict:
    """Seconds per training epoch (forward + backward) of two graph layers on the scenario's
    whole graph: the precomputed sparse adjacency against PyTorch Geometric's layers."""
    from torch_geometric.nn import FastRGCNConv, GCNConv, RGCNConv

    from workloads.mgtab import MGTABBots
    from workloads.mgtab.model import RGCNLayer, build_graph

    torch.set_num_threads(1)
    scenario = load_scenario("mgtab-bots", [])
    graph = MGTABBots.load_graph(scenario["mgtab"], 0)
    n, h = graph.num_nodes, scenario["mgtab"]["hidden"]
    g = build_graph(n, graph.edge_index, graph.edge_type, list(range(7)))
    both = torch.as_tensor(np.concatenate([graph.edge_index, graph.edge_index[::-1]], axis=1))
    types = torch.as_tensor(np.concatenate([graph.edge_type, graph.edge_type]))
    x = torch.randn(n, h)

    def timed(step) -> float:
        step()  # warm-up (and PyG's caches)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - start) / repeats

    def run(layers, forward):
        params = [p for layer in layers for p in layer.parameters()]

        def step():
            for p in params:
                p.grad = None
            forward().sum().backward()
        return timed(step)

    lin1, lin2 = torch.nn.Linear(h, h), torch.nn.Linear(h, h)
    gcn1, gcn2 = GCNConv(h, h, cached=True), GCNConv(h, h, cached=True)
    rg1, rg2 = RGCNLayer(h, 7), RGCNLayer(h, 7)
    pyg1, pyg2 = RGCNConv(h, h, 7, aggr="mean"), RGCNConv(h, h, 7, aggr="mean")
    fast1, fast2 = FastRGCNConv(h, h, 7, aggr="mean"), FastRGCNConv(h, h, 7, aggr="mean")
    return {
        "nodes": n, "edges": int(graph.edge_index.shape[1]), "hidden": h,
        "gcn_sparse_s": run([lin1, lin2], lambda: torch.sparse.mm(g.merged, lin2(torch.relu(torch.sparse.mm(
            g.merged, lin1(x)))))),
        "gcn_pyg_s": run([gcn1, gcn2], lambda: gcn2(torch.relu(gcn1(x, g.edge_index)), g.edge_index)),
        "rgcn_sparse_s": run([rg1, rg2], lambda: rg2(torch.relu(rg1(x, g)), g)),
        "rgcn_pyg_s": run([pyg1, pyg2], lambda: pyg2(torch.relu(pyg1(x, both, types)), both, types)),
        "rgcn_pyg_fast_s": run([fast1, fast2], lambda: fast2(torch.relu(fast1(x, both, types)), both, types)),
    }


def flower_timing() -> dict:
    """s/round of the scenario's federation (FedAvg, RGCN) through Flower (simulation engine
    on Ray) and through the in-process engine, on seed 0, without the reference runs."""
    from server.record import load_history
    from simulations.launcher import simulate

    scenario = load_scenario("mgtab-bots", ["mgtab.baselines=[]", "run.strategies=['fedavg']"])
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_history(simulate(scenario, out=Path(tmp)))["strategies"]["fedavg"]
    flower = float(np.median([r["wall_time_s"] for r in rows if r["round"] >= 2]))
    start = time.perf_counter()
    local = Reference(scenario).run("fedavg", keep_models=False)
    in_process = (time.perf_counter() - start) / (len(local) - 1)
    return {"flower_s_per_round": flower, "in_process_s_per_round": in_process,
            "same_final_f1": rows[-1]["f1_bot"] == local[-1]["f1_bot"]}


def _cell(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}"


def tables(results: dict) -> str:
    lines = []
    for setting, per_seed in results["settings"].items():
        seeds = sorted(per_seed, key=int)
        lines += [f"#### {setting}: {' '.join(SETTINGS[setting]) or 'the scenario'} (seeds {', '.join(seeds)})", "",
                  "| arm | bot F1 | bot acc | stance F1 | stance acc | ARI | chosen round | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm in per_seed[seeds[0]]:
            cells = [_cell(np.array([per_seed[s][arm][m] for s in seeds])) for m in METRICS]
            ari = [per_seed[s][arm]["ari"] for s in seeds]
            ari_cell = "–" if any(a is None for a in ari) else f"{np.mean(ari):.2f} ({min(ari):.2f} to {max(ari):.2f})"
            age = np.mean([per_seed[s][arm]["selected_age"] for s in seeds])
            secs = np.mean([per_seed[s][arm]["seconds"] for s in seeds])
            lines.append(f"| {arm} | {' | '.join(cells)} | {ari_cell} | {age:.0f} | {secs:.1f} |")
        lines += ["", "Bot macro-F1, paired over seeds (mean, worst to best seed; per seed):", "",
                  "| difference | wanted | mean | worst to best | per seed |", "|---|---|---|---|---|"]
        for label, a, b, wanted in PAIRS:
            if a not in per_seed[seeds[0]] or b not in per_seed[seeds[0]]:
                continue
            d = np.array([per_seed[s][a]["f1_bot"] - per_seed[s][b]["f1_bot"] for s in seeds])
            lines.append(f"| {label} | {wanted} | {d.mean():+.3f} | {d.min():+.3f} to {d.max():+.3f} | "
                         + ", ".join(f"{v:+.3f}" for v in d) + " |")
        rgcn = np.array([per_seed[s]["centralised"]["f1_bot"] for s in seeds])
        fed = np.array([per_seed[s]["fedavg"]["f1_bot"] for s in seeds])
        long = results.get("long", {}).get(setting)
        if long:
            lseeds = sorted(long, key=int)
            lines += ["", f"Trained 4x as long (600 epochs; seeds {', '.join(lseeds)}):", "",
                      "| arm | bot F1 | stance F1 | chosen round |", "|---|---|---|---|"]
            for arm in long[lseeds[0]]:
                f = np.array([long[s][arm]["f1_bot"] for s in lseeds])
                st = np.array([long[s][arm]["f1_stance"] for s in lseeds])
                age = np.mean([long[s][arm]["selected_age"] for s in lseeds])
                lines.append(f"| {arm} | {_cell(f)} | {_cell(st)} | {age:.0f} |")
        lines += ["", f"RGCN-7 bot F1 per seed: centralised {', '.join(f'{v:.3f}' for v in rgcn)} (sd "
                  f"{rgcn.std():.3f}, range {np.ptp(rgcn):.3f}); FedAvg {', '.join(f'{v:.3f}' for v in fed)} "
                  f"(sd {fed.std():.3f}, range {np.ptp(fed):.3f}).", ""]
    if "speed" in results:
        s = results["speed"]
        lines += [f"Two graph layers, one training epoch on the whole graph ({s['nodes']} users, {s['edges']} edges, "
                  f"hidden {s['hidden']}, one thread):", "",
                  "| layer | sparse adjacency (ms) | PyTorch Geometric (ms) | PyG / sparse |", "|---|---|---|---|",
                  f"| GCN | {1e3 * s['gcn_sparse_s']:.2f} | {1e3 * s['gcn_pyg_s']:.2f} (`GCNConv`, cached) | "
                  f"{s['gcn_pyg_s'] / s['gcn_sparse_s']:.1f}x |",
                  f"| RGCN | {1e3 * s['rgcn_sparse_s']:.2f} | {1e3 * s['rgcn_pyg_s']:.2f} (`RGCNConv`) | "
                  f"{s['rgcn_pyg_s'] / s['rgcn_sparse_s']:.1f}x |",
                  f"| RGCN | {1e3 * s['rgcn_sparse_s']:.2f} | {1e3 * s['rgcn_pyg_fast_s']:.2f} (`FastRGCNConv`) | "
                  f"{s['rgcn_pyg_fast_s'] / s['rgcn_sparse_s']:.1f}x |", ""]
    if "flower" in results:
        f = results["flower"]
        lines.append(f"Scenario (FedAvg, RGCN) through Flower: {f['flower_s_per_round']:.3f} s/round; in-process "
                     f"engine {f['in_process_s_per_round']:.3f} s/round; same final bot F1: {f['same_final_f1']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--long", default="", help="settings whose centralised baselines also train 4x as long")
    parser.add_argument("--speed", action="store_true", help="also time the graph layers (sparse against PyG)")
    parser.add_argument("--flower", action="store_true", help="also time the scenario through Flower")
    parser.add_argument("--tables", action="store_true", help="print the tables of the saved results and stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = OUT / "mgtab.json"
    if args.tables:
        print(tables(json.loads(path.read_text())))
        return
    start = time.perf_counter()
    results: dict = {"settings": {}}
    for setting in filter(None, args.settings.split(",")):
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; expected some of {list(SETTINGS)}")
        results["settings"][setting] = {s: one_seed(setting, int(s)) for s in args.seeds.split(",")}
    if args.long:
        results["long"] = {setting: {s: long_runs(setting, int(s)) for s in args.seeds.split(",")}
                           for setting in filter(None, args.long.split(","))}
    if args.speed:
        results["speed"] = speed()
    if args.flower:
        results["flower"] = flower_timing()
    results["seconds"] = time.perf_counter() - start
    OUT.mkdir(exist_ok=True)
    if path.is_file():  # keep the settings (and the timings) not re-run this time
        earlier = json.loads(path.read_text())
        results = {**earlier, **results, "settings": {**earlier.get("settings", {}), **results["settings"]},
                   "long": {**earlier.get("long", {}), **results.get("long", {})}}
    path.write_text(json.dumps(results, indent=1, default=float))
    print(tables(results))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
