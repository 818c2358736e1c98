"""Fault injection through Flower: SIGINT, SIGTERM and SIGKILL at a random round of a random
arm (fixed seeds), each followed by ``--resume`` and compared bit for bit with an
uninterrupted run; nothing hangs, and no process or temp folder is left behind.

Each run here is a real ``umbel run`` process with its own Ray (the default path, not the
session's shared cluster: a signal must stop the Ray that the run started); the
uninterrupted run is the in-process reference, whose records equal Flower's bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.lock import pid_alive, read_lock
from server.record import LOCK, load_history, load_models, record_status

UMBEL = str(Path(sys.executable).parent / "umbel")
# the default scenario, smaller: every arm of it, a few seconds of rounds
SCENARIO = ["default", "--set", "run.rounds=12", "--set", "federation.clients=200",
            "--set", "federation.cohort_size=25"]
ARMS = ["clustered-fedavg", "clustered-fedprox", "ifca", "fedavg", "oracle"]


def _umbel(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([UMBEL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _run_dir(out: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in out.glob("default-*") if (p / "history.json").is_file()]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no run record under {out}")


def _rows(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "history.json").read_text())["strategies"]
    except (OSError, ValueError):  # between two atomic writes
        return {}


def _processes_using(folder: str) -> list[str]:
    """Command lines of live processes that mention ``folder`` (Ray's, for its temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if folder in cmd:
                found.append(f"{proc.name}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, list[dict]]:
    """Every arm run without interruption, in-process: the same records as a Flower run bit
    for bit (tests/test_simulation.py), at a fraction of the cost."""
    from simulations.reference import Reference
    from simulations.scenarios import load_scenario

    ref = Reference(load_scenario(SCENARIO[0], [s for s in SCENARIO[1:] if s != "--set"]))
    return {arm: ref.run(arm) for arm in ARMS}


@pytest.mark.slow
@pytest.mark.parametrize("sig, seed", [(signal.SIGINT, 0), (signal.SIGTERM, 1), (signal.SIGKILL, 2)])
def test_a_signal_at_a_random_round_then_resume_ends_bit_identical(uninterrupted, tmp_path, sig, seed):
    rng = random.Random(seed)
    arm, round_ = rng.choice(ARMS), rng.randrange(2, 11)
    proc = _umbel("run", *SCENARIO, "--out", str(tmp_path))
    run_dir = _run_dir(tmp_path)
    deadline = time.monotonic() + 300
    while len(_rows(run_dir).get(arm, [])) <= round_:
        assert proc.poll() is None, f"the run ended before {arm} round {round_}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    temp_dirs = read_lock(run_dir / LOCK)["temp_dirs"]
    sent = time.monotonic()
    if sig == signal.SIGINT:  # Ctrl-C in a terminal: the whole process group
        os.killpg(proc.pid, sig)
    else:  # `kill PID`, `timeout`, a container stop: the run's own process
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    history = load_history(run_dir)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert record_status(run_dir, history).startswith("killed at round")
    else:
        assert proc.returncode == 128 + sig, err
        assert took < 10, f"{signal.Signals(sig).name} took {took:.1f} s to stop the run"
        assert "Traceback" not in err and "SIGABRT" not in err and "*** " not in err, err
        assert f"--resume {run_dir}" in err
        assert history["status"] == "interrupted"
        at = history["interrupted_at"]
        # nothing written after the signal: the record ends at its last complete round
        assert len(history["strategies"][at["arm"]]) == at["round"] + 1
        assert not (run_dir / LOCK).exists()
        for folder in temp_dirs:
            assert not Path(folder).exists(), f"{folder} was left behind"
            assert not _processes_using(folder), _processes_using(folder)
    resumed = subprocess.run([UMBEL, "run", "--resume", str(run_dir)], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    if sig == signal.SIGKILL:  # whoever takes over a dead owner's lock removes what it left
        assert "stale lock" in resumed.stdout + resumed.stderr
        for folder in temp_dirs:
            assert not Path(folder).exists(), f"{folder} was left behind"
            assert not _processes_using(folder), _processes_using(folder)  # Ray's died with the run
    assert load_history(run_dir)["status"] == "finished"
    new_rows = load_history(run_dir)["strategies"]
    for name in ARMS:
        whole = uninterrupted[name]
        for key, value in whole[-1]["models"].items():
            np.testing.assert_array_equal(load_models(run_dir, name)[key], value, err_msg=f"{name}/{key}")
        assert [r["estimation_error"] for r in new_rows[name]] == [r["estimation_error"] for r in whole]


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_stale_lock_is_taken_over(tmp_path):
    from server.lock import Lock, LockHeld

    path = tmp_path / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "temp_dirs": []}))
        with pytest.raises(LockHeld, match=f"process {sleeper.pid}"):
            Lock(path, "run record x").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not pid_alive(sleeper.pid)
    left = tmp_path / "umbel-ray-left"
    left.mkdir()
    path.write_text(json.dumps({"pid": sleeper.pid, "temp_dirs": [str(left)]}))
    warnings: list[str] = []
    lock = Lock(path, "run record x")
    lock.acquire(warnings.append)
    assert read_lock(path)["pid"] == os.getpid() and not left.exists()
    assert f"stale lock of process {sleeper.pid}" in warnings[0] and str(left) in warnings[0]
    lock.release()
    assert not path.exists()


def test_resume_of_a_run_still_going_is_refused_and_the_report_tells_running_from_killed(tmp_path):
    from typer.testing import CliRunner

    from umbel.cli import app

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "scenario.toml").write_text('[run]\nname = "x"\n[federation]\nclients = 4\n')
    history = {"name": "x", "workload": "mixed_regression", "seed": 0, "key_metric": "estimation_error",
               "status": "running", "strategies": {"fedavg": [{"round": 0}, {"round": 1}, {"round": 2}]}}
    (run_dir / "history.json").write_text(json.dumps(history))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run_dir / LOCK).write_text(json.dumps({"pid": sleeper.pid, "temp_dirs": []}))
        assert record_status(run_dir) == "running"
        result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
        assert result.exit_code == 2 and f"process {sleeper.pid}" in result.output
    finally:
        sleeper.kill()
        sleeper.wait()
    assert record_status(run_dir) == "killed at round 2 of fedavg"
