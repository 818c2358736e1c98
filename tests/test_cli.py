"""The `umbel` command end to end, as a user runs it (its own Ray start-up included)."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.record import load_history
from simulations.launcher import RunFailed, simulate
from simulations.scenarios import load_scenario
from umbel.cli import app

UMBEL = str(Path(sys.executable).parent / "umbel")


@pytest.mark.slow
def test_run_tiny_scenario_then_report(tmp_path):
    out = tmp_path / "runs"
    ray_dirs_before = set(Path("/tmp").glob("umbel-ray-*"))
    proc = subprocess.run(
        [UMBEL, "run", "tiny", "--set", "run.rounds=2", "--seed", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("tiny-")
    history = load_history(run_dir)
    assert history["status"] == "finished" and history["seed"] == 4
    assert set(history["strategies"]) == {"fedavg", "fedprox"}
    assert "| fedavg |" in proc.stdout and str(run_dir) in proc.stdout
    (run_dir / "summary.md").unlink()
    (run_dir / "estimation_error.png").unlink()
    proc = subprocess.run([UMBEL, "report", str(run_dir)], capture_output=True, text=True)
    assert proc.returncode == 0
    assert (run_dir / "summary.md").is_file() and (run_dir / "estimation_error.png").is_file()
    # Ray's temp dir was the run's own, and it is gone
    assert set(Path("/tmp").glob("umbel-ray-*")) == ray_dirs_before


def test_unreachable_ray_address_is_bad_input(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "tiny", "--ray-address", "127.0.0.1:9", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "no Ray head answers" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_exits_non_zero(ray_cluster, tmp_path, monkeypatch):
    from server.record import RunObserver

    class Crash(RunObserver):
        def on_round(self, strategy, row):
            if row["round"] == 2:
                raise RuntimeError("disk full")

    scenario = load_scenario("tiny")
    with pytest.raises(RunFailed, match="disk full"):
        simulate(scenario, out=tmp_path, ray_address=ray_cluster, observer=Crash())
    (run_dir,) = tmp_path.iterdir()
    history = load_history(run_dir)
    assert history["status"] == "failed" and "disk full" in history["error"]

    import simulations.launcher as launcher

    def failing(*args, **kwargs):
        raise RunFailed("run failed: boom")

    monkeypatch.setattr(launcher, "simulate", failing)
    result = CliRunner().invoke(app, ["run", "tiny", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "boom" in result.output
