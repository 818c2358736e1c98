"""A million clients on one machine: Flower's simulation engine against the numpy limit.

For 10^4, 10^5 and 10^6 clients of the ``scale`` scenario (clustered-fedavg, 16 cohorts that
reply with per-cluster partial sums, data memory-mapped per machine):

- seconds per round through Flower (rounds 2.., after start-up, from the run record);
- seconds per round of the same round in one process with the best kernel here (the limit:
  one pass computing every client's residuals under the k models with BLAS, the loss, the
  choice, the gradient step from the residuals already computed, and per-cluster sums);
- their ratio (limit / Flower: 1 means Flower costs nothing on top);
- start-up: from the launch to the end of round 1 (Ray, Flower, data generation, Phase 1);
- peak memory of all processes (the sum of proportional set sizes, PSS, so pages shared
  through the page cache count once), sampled every 0.2 s;
- the final estimation error relative to the label oracle;
- cohorts that generated data after round 1 (0: data are never regenerated).

Usage: python benchmarks/scale.py [--sizes 10000 100000 1000000] [--rounds 30] [--out benchmarks/results]
Writes ``scale.json``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from server.record import RunObserver, load_history  # noqa: E402
from server.run_config import client_view  # noqa: E402
from simulations.launcher import simulate  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402
from workloads.mixed_regression import LinearCohort, MixedRegression  # noqa: E402


def _children(pid: int) -> set[int]:
    """``pid`` and all its descendants (Ray's head, raylet and workers are children)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += parents.get(p, [])
    return out


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the PSS of this process tree in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(p) for p in _children(os.getpid())))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Clock(RunObserver):
    """When round 1 ended."""

    def __init__(self) -> None:
        self.round1 = None

    def on_round(self, strategy: str, row: dict) -> None:
        if row["round"] == 1 and self.round1 is None:
            self.round1 = time.perf_counter()


def scenario_for(clients: int, rounds: int) -> dict:
    nodes = min(16, max(2, clients // 62_500))  # two nodes (one per actor) up to 10^5
    return load_scenario("scale", [f"federation.clients={clients}",
                                   f"federation.cohort_size={-(-clients // nodes)}",
                                   f"run.rounds={rounds}"])


def flower_run(clients: int, rounds: int, out: Path) -> dict:
    scenario = scenario_for(clients, rounds)
    clock = Clock()
    start = time.perf_counter()
    with PeakMemory() as memory:
        run_dir = simulate(scenario, out=out, observer=clock)
    rows = load_history(run_dir)["strategies"]["clustered-fedavg"]
    steady = [r["wall_time_s"] for r in rows if r["round"] >= 2]
    return {
        "s_per_round": float(np.mean(steady)),
        "nodes": -(-clients // scenario["federation"]["cohort_size"]),
        "startup_s": clock.round1 - start,  # launch to the end of round 1 (Ray, data, Phase 1)
        "peak_gib": memory.peak / 2**30,
        "error_vs_oracle": rows[-1]["estimation_error"] / rows[-1]["oracle_error"],
        "phase1_vs_oracle": rows[0]["estimation_error"] / rows[0]["oracle_error"],
        "cohorts_generated_after_round1": sum(r.get("cohorts_generated", 0) for r in rows[2:]),
        "run_dir": str(run_dir),
    }


def limit_round(data: LinearCohort, step: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One clustered-fedavg round over every client in one process, the fastest way here:
    residuals under all k models in one BLAS pass per chunk, reused for the gradient."""
    k, d = w.shape
    sums, counts = np.zeros((k, d)), np.zeros(k)
    for c0, c1, p0, p1 in data.chunks():
        x, n = data.x[p0:p1], data.num_examples[c0:c1]
        starts = data.starts[c0:c1] - p0
        residual = x @ w.T - data.y[p0:p1, None]  # (p, k)
        choice = np.add.reduceat(residual * residual, starts, axis=0).argmin(axis=1)
        owner = np.repeat(np.arange(c1 - c0), n)
        r = residual[np.arange(p1 - p0), choice[owner]]
        grad_sum = 2.0 * np.add.reduceat(x * r[:, None], starts, axis=0)  # n_i * gradient_i
        # sum_i n_i (w_c - eta_i g_i) = n_c w_c - sum_i eta_i (n_i g_i)
        moved = step[c0:c1, None] * grad_sum
        for j in range(k):
            sums[j] -= moved[choice == j].sum(axis=0)
        counts += np.bincount(choice, weights=n, minlength=k)
    return (sums + counts[:, None] * w) / np.maximum(counts, 1)[:, None]


def limit(clients: int, rounds: int = 5) -> dict:
    scenario = scenario_for(clients, rounds)
    wl = MixedRegression(client_view(scenario))
    parts = [wl.client_data(np.arange(lo, min(lo + 65536, clients))) for lo in range(0, clients, 65536)]
    data = LinearCohort(np.concatenate([p.client_ids for p in parts]), np.concatenate([p.num_examples for p in parts]),
                        np.concatenate([p.labels for p in parts]), np.concatenate([p.x for p in parts]),
                        np.concatenate([p.y for p in parts]))
    del parts
    train = scenario["train"]
    step = np.full(len(data.client_ids), train["lr"]) if train["step_cap"] == 0 else \
        np.minimum(train["lr"], train["step_cap"] / data.lambda_max)
    w = wl.true_models + 0.05 * np.random.default_rng(0).standard_normal(wl.true_models.shape)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        w = limit_round(data, step, w)
        times.append(time.perf_counter() - t)
    return {"s_per_round": float(np.median(times)), "points": int(data.num_examples.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for clients in args.sizes:
        flower = flower_run(clients, args.rounds, args.out / "runs")
        lim = limit(clients)
        results.append({"clients": clients, "flower": flower, "limit": lim,
                        "ratio": lim["s_per_round"] / flower["s_per_round"]})
        print(f"{clients}: done ({flower['s_per_round']:.3f} s/round)", flush=True)
        (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    print("\n| clients | points | nodes | Flower s/round | limit s/round | ratio | start-up s (to end of round 1) | peak GiB (all processes) | final ÷ oracle | Phase 1 ÷ oracle | regenerated after round 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        f, lim = r["flower"], r["limit"]
        print(f"| {r['clients']:,} | {lim['points']:,} | {f['nodes']} | {f['s_per_round']:.3f} | {lim['s_per_round']:.3f} | "
              f"{r['ratio']:.2f} | {f['startup_s']:.1f} | {f['peak_gib']:.2f} | "
              f"{f['error_vs_oracle']:.3f} | {f['phase1_vs_oracle']:.1f} | {f['cohorts_generated_after_round1']} |")
    print(f"\nwrote {args.out / 'scale.json'}")


if __name__ == "__main__":
    main()
