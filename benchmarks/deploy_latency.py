"""Per-round latency of a deployment (a real SuperLink and three SuperNodes on loopback, TLS
and device authentication on) against a simulation of the same scenario (Flower's
simulation engine, Ray), and whether their final models agree.

The scenario is ``deploy-tiny`` (three devices, one client each, the clustered strategy
with Phase 1) with more rounds. Rounds are timed by the server (send, client work, replies,
aggregation); round 1 (Phase 1 and start-up) is reported apart from the steady rounds.
Deployments are measured with Flower's own timings (SuperNodes poll every 3 s) and with
a 0.5 s poll (``umbel deploy supernode --poll 0.5``).

Usage: python benchmarks/deploy_latency.py [--rounds 8] [--out benchmarks/results]
Prints a table and writes ``deploy_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from server.record import load_history, load_models
from deployment import deploy
from deployment.certs import make_certs
from simulations.launcher import simulate
from simulations.scenarios import load_scenario

ARM = "clustered-fedavg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_times(run_dir: Path) -> list[float]:
    return [r["wall_time_s"] for r in load_history(run_dir)["strategies"][ARM][1:]]


def deployed(scenario: dict, root: Path, poll: float) -> tuple[Path, float]:
    """One deployment from scratch: certs, SuperLink, three registered SuperNodes, a run.
    Returns the run record and the seconds from submission to the end of the run."""
    home = deploy.Home(root / "deploy")
    names = [f"dev-{i}" for i in range(3)]
    make_certs(home.certs, ["127.0.0.1"], names)
    files = deploy.export_device_data(scenario, root / "data")
    port = _free_port()
    try:
        deploy.start_superlink(home, port=port)
        for i, name in enumerate(names):
            deploy.register_device(home, home.certs / "devices" / f"{name}.pub")
            deploy.start_supernode(home, name, files[i], f"127.0.0.1:{port}", _free_port(), poll=poll)
        start = time.time()
        run_id = deploy.submit(home, scenario, root / "runs")
        status = deploy.wait_run(home, run_id, timeout=1800)
        elapsed = time.time() - start
        if status["status"] != "finished:completed":
            raise RuntimeError(f"deployment run failed: {status}")
        return deploy.find_run_dir(root / "runs", scenario["run"]["name"], start), elapsed
    finally:
        deploy.stop_all(home, timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    scenario = load_scenario("deploy-tiny", [f"run.rounds={args.rounds}"])
    results = {}
    with tempfile.TemporaryDirectory(prefix="umbel-bench-deploy-") as tmp:
        tmp = Path(tmp)
        start = time.time()
        sim_dir = simulate(scenario, out=tmp / "sim")
        results["simulation"] = {"dir": sim_dir, "total_s": time.time() - start}
        for poll in (3.0, 0.5):
            run_dir, total = deployed(scenario, tmp / f"poll-{poll}", poll)
            results[f"deployment, poll {poll:g} s"] = {"dir": run_dir, "total_s": total}
        reference = load_models(sim_dir, ARM)["w"]
        rows = []
        for name, r in results.items():
            times = round_times(r["dir"])
            steady = statistics.median(times[1:])
            rows.append({
                "setup": name, "round1_s": times[0], "steady_round_s": steady,
                "steady_over_simulation": None, "total_s": r["total_s"],
                "max_abs_model_diff_vs_simulation": float(np.abs(load_models(r["dir"], ARM)["w"] - reference).max()),
            })
    sim_steady = rows[0]["steady_round_s"]
    for row in rows:
        row["steady_over_simulation"] = row["steady_round_s"] / sim_steady
    print(f"deploy-tiny, 3 nodes, {args.rounds} rounds (steady: median of rounds 2..{args.rounds})")
    print("| setup | round 1 (s) | steady round (s) | ÷ simulation | total (s) | max |Δ model| vs simulation |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['round1_s']:.2f} | {r['steady_round_s']:.3f} | "
              f"{r['steady_over_simulation']:.0f}× | {r['total_s']:.1f} | {r['max_abs_model_diff_vs_simulation']:.1e} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_latency.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
