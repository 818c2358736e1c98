"""MLflow tracking (simulations/tracking.py): what a tracked run leaves in the store, read
back with MlflowClient, and MLflow's own compare view of two arms in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from server.record import RunRecord, load_history
from simulations.report import write_report
from simulations.scenarios import load_scenario

mlflow = pytest.importorskip("mlflow", reason="MLflow tracking needs the tracking extra: pip install 'umbel[tracking]'")

from mlflow.tracking import MlflowClient  # noqa: E402

from simulations.tracking import MLflowTracker, default_uri  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "test-artifacts"  # git-ignored: kept for a person (or CI) to look at
KEY = "estimation_error"


def tracked_reference_run(out: Path, uri: str) -> tuple[MLflowTracker, Path]:
    """"tiny" through the in-process reference, with a run record and a tracker as observers."""
    from simulations.launcher import Observers
    from simulations.reference import Reference

    scenario = load_scenario("tiny", [f'run.out="{out}"'])
    tracker = MLflowTracker(scenario, uri=uri)
    run_dir = out / "tiny-tracked"
    run_dir.mkdir(parents=True)
    record = RunRecord(run_dir, scenario)
    try:
        observers = Observers(record, tracker)
        ref = Reference(scenario)
        for strategy in scenario["run"]["strategies"]:
            ref.run(strategy, keep_models=False, observer=observers, label=strategy)
        record.finish("finished")
    finally:
        record.close()
    write_report(run_dir)
    tracker.finish(run_dir, "finished")
    return tracker, run_dir


def test_default_store_is_sqlite_under_the_run_records(tmp_path):
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"


def test_a_tracked_run_has_a_parent_an_arm_per_strategy_their_rounds_and_the_report(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracker, run_dir = tracked_reference_run(tmp_path, uri)
    client = MlflowClient(tracking_uri=uri)
    history = load_history(run_dir)

    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [tracker.run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_dir.name
    assert parent.data.params["federation.clients"] == "60"
    assert parent.data.params["run.strategies"] == '["fedavg", "fedprox"]'
    assert parent.data.tags["umbel.run_dir"] == str(run_dir.resolve())
    assert parent.data.tags["umbel.key_metric"] == KEY

    arms = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == tracker.run_id}
    assert set(arms) == set(history["strategies"]) == {"fedavg", "fedprox"}
    rounds = 3
    for label, arm in arms.items():
        assert arm.info.status == "FINISHED"
        assert arm.data.params == {"arm": label, "strategy": label}
        logged = {m.step: m.value for m in client.get_metric_history(arm.info.run_id, KEY)}
        rows = history["strategies"][label]
        assert sorted(logged) == list(range(rounds + 1))
        assert logged == pytest.approx({int(r["round"]): r[KEY] for r in rows}, rel=1e-12)
        # a loss is filled into a row one round later: it is logged all the same
        name = history["loss_name"]
        loss = {r["round"]: r[name] for r in rows if name in r}
        assert sorted(loss) == list(range(rounds + 1))
        assert {m.step: m.value for m in client.get_metric_history(arm.info.run_id, name)} == pytest.approx(loss)
        assert not any(isinstance(v, bool) for v in arm.data.metrics.values())

    files = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert {"summary.md", "scenario.toml", f"{KEY}.png"} <= files
    # the artefacts live next to the store, not in the working directory
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


def test_interrupted_runs_end_killed_and_a_missing_arm_end_is_closed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    scenario = load_scenario("tiny")
    tracker = MLflowTracker(scenario, uri=uri, experiment="cut-short")
    tracker.on_strategy_start("fedavg", 3)
    tracker.on_round("fedavg", {"round": 0, KEY: 1.5, "flag": True, "inf": float("inf"), "sizes": [1, 2],
                                 "top@5": 0.25})
    tracker.finish(tmp_path, "interrupted")
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("cut-short").experiment_id])}
    # the parent is named after its run directory once that is known
    assert runs["fedavg"].info.status == "KILLED" and runs[tmp_path.name].info.status == "KILLED"
    assert runs["fedavg"].data.metrics == {KEY: 1.5, "top_5": 0.25}  # finite numbers only, names MLflow takes
    with pytest.raises(ValueError, match="finished, failed, interrupted"):
        tracker.finish(tmp_path, "done")


def test_without_mlflow_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'umbel\[tracking\]'"):
        MLflowTracker(load_scenario("tiny"), uri="sqlite:////nonexistent/never.db")


@pytest.mark.slow
def test_a_simulated_run_is_tracked_from_the_server_thread(tmp_path, ray_cluster):
    """Through the launcher: the ServerApp's thread calls the tracker, the caller finishes it."""
    from simulations.launcher import simulate

    uri = default_uri(tmp_path)
    scenario = load_scenario("tiny", [f'run.out="{tmp_path}"'])
    tracker = MLflowTracker(scenario, uri=uri)
    run_dir = simulate(scenario, out=tmp_path, ray_address=ray_cluster, observer=tracker)
    tracker.finish(run_dir, "finished")
    history = load_history(run_dir)
    client = MlflowClient(tracking_uri=uri)
    arms = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")
    assert {r.info.run_name for r in arms} == set(history["strategies"]) == {"fedavg", "fedprox"}
    for arm in arms:
        rows = history["strategies"][arm.info.run_name]
        logged = {m.step: m.value for m in client.get_metric_history(arm.info.run_id, KEY)}
        assert logged == pytest.approx({r["round"]: r[KEY] for r in rows}, rel=1e-12)
        assert arm.info.status == "FINISHED"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert {"summary.md", f"{KEY}.png"} <= {f.path for f in client.list_artifacts(tracker.run_id)}


# -- MLflow's UI ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on loopback over a fresh store: yields (uri of the store, its URL)."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")
    # no job runner: it would start a fleet of huey consumers this test has no use for
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
         "--artifacts-destination", str(tmp_path / "mlruns" / "served"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not answer on {url}: "
                            f"{(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield uri, url
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it and its uvicorn worker), SIGKILL to
    whatever of that group is left after a short grace period (the store is a throwaway:
    the server often outwaited a 10 s grace)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow 3's compare view: ``#/compare-runs?runs=[ids]&experiments=[ids]`` (JSON lists)."""
    return (f"{base}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
            f"&experiments={quote(json.dumps(experiment_ids))}")


@pytest.mark.slow
def test_mlflow_compare_view_shows_both_arms_and_the_key_metric(tmp_path, mlflow_server):
    from browser import ensure_chromium, rendered_dom, screenshot

    ensure_chromium()  # before the clock of the page loads starts: a first run installs it
    uri, url = mlflow_server
    tracker, _ = tracked_reference_run(tmp_path / "runs", uri)
    client = MlflowClient(tracking_uri=uri)
    arms = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")
    ids = {r.info.run_name: r.info.run_id for r in arms}
    assert set(ids) == {"fedavg", "fedprox"}
    page = compare_url(url, [ids["fedavg"], ids["fedprox"]], [tracker.experiment_id])

    dom = rendered_dom(page)
    (tmp_path / "compare.html").write_text(dom)
    shot = screenshot(page, tmp_path / "mlflow-compare.png", size="1600,2000")  # down to the metrics table
    ARTEFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTEFACTS / "mlflow-compare.png")
    shutil.copy(tmp_path / "compare.html", ARTEFACTS / "mlflow-compare.html")

    assert "Comparing 2 Runs" in dom or "Comparing 2 runs" in dom, dom[-3000:]
    for name in ("fedavg", "fedprox", KEY):
        assert name in dom, f"{name} not on the rendered compare page (see {ARTEFACTS / 'mlflow-compare.html'})"
    assert ids["fedavg"] in dom and ids["fedprox"] in dom
    for run_id in ids.values():  # the key metric's last value, as the metrics table rounds it
        assert f"{client.get_run(run_id).data.metrics[KEY]:.3f}" in dom
