"""Shared fixtures: one local Ray cluster (``ray start --head``) for all integration tests.

Attaching to it is also the documented multi-machine path (``umbel run --ray-address``), so
every integration test exercises it. Its temp dir lives under pytest's tmp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

# The longest test files (measured), first: `make test` hands whole files to its workers in
# this order (`--dist loadfile --no-loadscope-reorder`), so each starts on a long one and they
# finish together instead of one worker running the long files alone at the end.
LONGEST_FIRST = ["test_deploy_workloads.py", "test_deploy_processes.py", "test_koopman.py", "test_clustered.py",
                 "test_backdoor.py", "test_interrupt.py", "test_mgtab.py", "test_active_learning.py", "test_ceco.py",
                 "test_pmt_iqa.py", "test_sstam.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def on_both_cores(calls: list[tuple]) -> list:
    """Run independent ``(function, *args)`` calls in two fresh processes (one torch thread
    each, as in the suite's own process, so results are the same bits) and return their
    results in order: the heavy training fixtures use the machine's two cores."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in calls]
        return [f.result() for f in futures]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """Address of a two-node Ray cluster on loopback for this test session (stopped at the
    end): a head and a second worker node, one CPU each, so two actors, one per node. Every
    integration test thus runs the multi-machine path."""
    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="umbel-test-ray-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "OMP_NUM_THREADS": "1"}
    ray = str(BIN / "ray")
    common = ["--num-cpus=1", "--disable-usage-stats"]
    subprocess.run(
        [ray, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
         "--include-dashboard=false", *common],
        check=True, env=env, capture_output=True,
    )
    subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common],
                   check=True, env=env, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_cluster(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_ray_cluster(temp_dir: str, port: int, timeout: float = 5.0) -> None:
    """Stop the Ray processes of the cluster whose temp dir is ``temp_dir`` and whose GCS
    listens on ``port`` (each of its processes names one of them on its command line), with
    their children. ``ray stop --force`` would kill every Ray cluster on the machine,
    including another suite's or a user's run."""
    import psutil

    def ours(proc: psutil.Process) -> bool:
        try:
            return any(temp_dir in arg or (arg.startswith(("--address=", "--gcs-address="))
                                           and arg.endswith(f":{port}")) for arg in proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    roots = [p for p in psutil.process_iter() if p.pid not in spared and ours(p)]
    procs = {p.pid: p for p in roots}
    for root in roots:
        try:
            procs.update((c.pid, c) for c in root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for proc in procs.values():  # SIGKILL, as `ray stop --force`: some of Ray's ignore SIGTERM
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs.values()):
        time.sleep(0.05)


def _alive(proc) -> bool:
    """Running and not a zombie (a dead process whose parent, e.g. `ray start`, is gone)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

