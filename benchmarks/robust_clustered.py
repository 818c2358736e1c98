"""Robust rules inside the clustered family: clustered-fedavg when 10% of the clients send
updates scaled by 10, with each cluster aggregated by the mean (the default), the weighted
median, the weighted trimmed mean (beta 0.2) or Krum, against the clean run.

Default instance (1000 Zipf clients, k = 4, 150 rounds), in-process reference (the same
arithmetic as the Flower run, which the tests check), seeds 0-4 by default. Also the cost:
seconds per arm.

Usage: python benchmarks/robust_clustered.py [--seeds 0-4] [--workers 2]
Writes ``benchmarks/results/robust_clustered.json``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from simulations.compare import parse_seeds  # noqa: E402
from simulations.reference import Reference  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402

RULES = ("mean", "median", "trimmed-mean", "krum")
ATTACK = ["federation.scaled_update_fraction=0.1", "federation.scaled_update_factor=10.0"]


def one_seed(seed: int) -> dict:
    labels = [f"rule-{r}" for r in RULES]
    settings = [f"strategy.rule-{r}.use='clustered-fedavg'" for r in RULES]
    settings += [f"strategy.rule-{r}.aggregate='{r}'" for r in RULES]
    out = {"seed": seed}
    for name, extra in (("clean", []), ("attacked", ATTACK)):
        scenario = load_scenario("default", ["run.strategies=[" + ", ".join(f'"{x}"' for x in labels) + "]",
                                             *settings, *extra], seed)
        ref = Reference(scenario)
        for rule, label in zip(RULES, labels):
            start = time.perf_counter()
            rows = ref.run(label, keep_models=False)
            out[f"{name}/{rule}"] = {"error": rows[-1]["estimation_error"], "seconds": time.perf_counter() - start}
    return out


def table(results: list[dict]) -> str:
    clean = np.array([r["clean/mean"]["error"] for r in results])
    lines = ["| per-cluster rule | clean error | attacked error | attacked ÷ clean clustered-fedavg (per seed) | "
             "worst | s/arm |", "|---|---|---|---|---|---|"]
    for rule in RULES:
        c = np.array([r[f"clean/{rule}"]["error"] for r in results])
        a = np.array([r[f"attacked/{rule}"]["error"] for r in results])
        ratio = a / clean
        secs = np.mean([r[f"attacked/{rule}"]["seconds"] for r in results])
        lines.append(f"| {rule} | {c.mean():.4g} ± {c.std(ddof=1):.2g} | {a.mean():.4g} ± {a.std(ddof=1):.2g} | "
                     f"{', '.join(f'{x:.2f}' for x in ratio)} | {ratio.max():.2f} | {secs:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(one_seed, seeds))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "robust_clustered.json").write_text(json.dumps(results, indent=1))
    print(f"seeds {seeds}: 10% of clients scale their update by 10\n")
    print(table(results))


if __name__ == "__main__":
    main()
