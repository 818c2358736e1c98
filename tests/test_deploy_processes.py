"""Deployment with real processes on loopback: Flower's SuperLink and SuperNodes started by
``deployment.deploy`` with TLS and device authentication, and ``umbel run`` processes killed
and resumed. Nothing of Flower is mocked."""

from __future__ import annotations

import json
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from deployment import deploy
from deployment_support import DEVICES, Deployment, no_labels_no_drops, umbel
from server import monitor
from server.record import CHECKPOINT, load_history, load_models
from simulations.launcher import simulate
from simulations.scenarios import load_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        yield d
    finally:
        deploy.stop_all(d.home, timeout=1)


@pytest.fixture(scope="module")
def labelled_run(deployment) -> tuple[dict, Path]:
    """``deploy-tiny`` on the three devices (files with their true clusters), run once."""
    return deployment.run(deployment.scenario)


def test_three_devices_with_tls_and_authentication_match_the_simulation(deployment, labelled_run, ray_cluster,
                                                                       tmp_path):
    status, run_dir = labelled_run
    assert status["status"] == "finished:completed", status
    simulated = simulate(deployment.scenario, out=tmp_path, ray_address=ray_cluster)
    deployed = load_models(run_dir, "clustered-fedavg")["w"]
    np.testing.assert_allclose(deployed, load_models(simulated, "clustered-fedavg")["w"], rtol=0, atol=1e-9)
    rows = load_history(run_dir)["strategies"]["clustered-fedavg"]
    assert [r["clients"] for r in rows[1:]] == [3, 3, 3] and rows[-1]["ari"] == 1.0
    # Each device kept its progress on its own disk.
    for name in DEVICES:
        state = json.loads((deployment.home.root / "nodes" / name / "state" / "umbel-device-state.json").read_text())
        assert state["clustered-fedavg"]["rounds"] == 3


def test_an_unregistered_key_is_refused_and_a_node_without_the_ca_cannot_connect(deployment):
    rogue = deployment.start("rogue", deployment.files[0], max_retries=1)
    no_ca = deployment.start("no-ca", deployment.files[0], max_retries=1,
                             ca=deployment.root / "other-ca" / "ca.crt")
    for started, says, fix in ((rogue, "Failed to activate SuperNode", "is not registered"),
                               (no_ca, "CERTIFICATE_VERIFY_FAILED", "copy the deployment's certs/ca.crt")):
        with pytest.raises(deploy.DeployError, match="exited") as refused:
            deploy.still_running(started, grace=30)
        assert says in started.log.read_text() and fix in str(refused.value)


def test_a_second_superlink_is_refused_by_the_homes_lock_and_by_its_port(deployment, tmp_path):
    """The running SuperLink's pid file is the home's lock: a second one in the same home is
    refused with its pid; one from another home on the same port is refused naming the port.
    The first keeps running, and its pid file still names it (so `deploy stop` stops it)."""
    home, port = deployment.home, int(deployment.link.rpartition(":")[2])
    pid = int((home.pids / "superlink.pid").read_text())
    with pytest.raises(deploy.DeployError, match=f"already running \\(process {pid}\\)"):
        deploy.start_superlink(home, port=port)
    with pytest.raises(deploy.DeployError, match=f"127.0.0.1:{port} is taken"):
        deploy.start_superlink(deploy.Home(tmp_path / "other"), port=port, insecure=True)
    assert deploy.is_running(pid) and int((home.pids / "superlink.pid").read_text()) == pid
    with pytest.raises(deploy.DeployError, match="supernode-dev-0 of .* is already running"):
        deployment.start("dev-0", deployment.files[0])


def test_a_killed_device_misses_its_round_and_rejoins_with_its_state_from_disk(deployment):
    """dev-2 is killed (SIGKILL) once round 1 is recorded and restarted at once: its round
    finishes with the others and records the failure; the device rejoins (once the SuperLink
    lets go of its old session) and reads its rounds and cluster back from disk. A fourth
    device with a truncated data file answers with an error that names the file."""
    home = deployment.home
    truncated = deployment.root / "truncated.npz"
    truncated.write_bytes(deployment.files[0].read_bytes()[:200])
    deployment.start("bad", truncated)
    scenario = load_scenario("deploy-tiny", [
        "run.name='deploy-kill'", "run.strategies=['ifca']", "run.rounds=5", "run.round_timeout=30.0"])
    state_file = home.root / "nodes" / "dev-2" / "state" / "umbel-device-state.json"
    seen: dict = {"failures": []}

    def on_event(event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "round_finished" and event.round_finished.round == 1:
            deploy.stop(home, "supernode-dev-2", signal.SIGKILL)
            seen["at_kill"] = json.loads(state_file.read_text())["ifca"]
            # Same key, same state folder; retried while the SuperLink holds the old session.
            deployment.start("dev-2", deployment.files[2], rejoin=60.0)
        elif kind == "client_failure":
            seen["failures"].append((event.client_failure.round, event.client_failure.reason))

    status, run_dir = deployment.run(scenario, on_event)
    deploy.stop(home, "supernode-bad")
    assert status["status"] == "finished:completed", status
    rows = load_history(run_dir)["strategies"]["ifca"]
    clients = [r.get("clients") for r in rows]
    assert clients[1] == 3 and clients[2] == 2, clients  # the killed round went on without dev-2
    assert any(r == 2 for r, _ in seen["failures"]), seen["failures"]
    assert all(c <= 3 for c in clients[1:])  # the bad device never counts as a client
    bad = [d for r in rows[1:] for d in r.get("dropped_replies", []) if "device data" in d]
    assert bad and all("truncated.npz" in d and "not a readable .npz" in d for d in bad)
    rejoined = [r for r in rows[3:] if r["clients"] == 3]
    assert rejoined, clients
    from_disk = rejoined[0]["devices"]["2"]
    assert from_disk["rounds-before"] >= seen["at_kill"]["rounds"] >= 1
    assert json.loads(from_disk["clusters-before"]) == seen["at_kill"]["clusters"]


def test_watch_streams_a_simulation_and_a_killed_server_resumes_to_the_same_models(ray_cluster, tmp_path):
    """`umbel watch` follows a running simulation; a `umbel run` killed with SIGKILL
    mid-run, resumed with --resume, ends with the uninterrupted run's models."""
    args = ["run", "tiny", "--set", "run.strategies=['clustered-fedavg','fedavg']", "--set", "run.rounds=8",
            "--set", "anchors.count=4", "--ray-address", ray_cluster]

    def run_dir_of(out: Path) -> Path:
        deadline = time.monotonic() + 60
        while not list(out.glob("tiny-*/monitor.address")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return next(out.glob("tiny-*"))

    # Uninterrupted, watched by the CLI and by the client API.
    full = umbel(*args, "--out", str(tmp_path / "full"))
    full_dir = run_dir_of(tmp_path / "full")
    watcher = umbel("watch", str(full_dir))
    streamed = list(monitor.watch((full_dir / monitor.ADDRESS_FILE).read_text().strip(), timeout=120))
    assert full.wait(timeout=120) == 0 and watcher.wait(timeout=30) == 0
    stored = monitor.read_events(full_dir)
    assert streamed == stored
    rounds = [(e.round_finished.arm, e.round_finished.round) for e in stored if e.HasField("round_finished")]
    assert rounds == [(a, r) for a in ("clustered-fedavg", "fedavg") for r in range(9)]
    lines = watcher.stdout.read().splitlines()
    assert len(lines) == len(stored) and "run finished" in lines[-1]

    # Killed (SIGKILL) once round 3 of the first arm is recorded, then resumed.
    killed = umbel(*args, "--out", str(tmp_path / "killed"))
    killed_dir = run_dir_of(tmp_path / "killed")
    for event in monitor.watch((killed_dir / monitor.ADDRESS_FILE).read_text().strip(), timeout=120):
        if event.HasField("round_finished") and event.round_finished.round == 3:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=30)
    assert load_history(killed_dir)["status"] == "running"  # it never got to say otherwise
    resumed = umbel("run", "--resume", str(killed_dir), "--ray-address", ray_cluster)
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()
    history = load_history(killed_dir)
    assert history["status"] == "finished"
    starts = [e.run_started for e in monitor.read_events(killed_dir) if e.HasField("run_started")]
    assert len(starts) == 2 and starts[1].resumed_from_round >= 1
    for arm in ("clustered-fedavg", "fedavg"):
        np.testing.assert_allclose(load_models(killed_dir, arm)["w"], load_models(full_dir, arm)["w"],
                                   rtol=0, atol=1e-12)
        assert len(history["strategies"][arm]) == 9


def test_devices_without_cluster_labels_train_the_labelled_models_checkpoint_and_resume(labelled_run, tmp_path):
    """The default export (no cluster labels, as on real devices): the clustered strategy
    trains with no dropped replies to the final models of the same deployment with labelled
    files, its record has no misclustering or ARI, and the run, stopped once round 1 is
    checkpointed, resumes with `umbel deploy run --resume`."""
    names = ["plain-0", "plain-1", "plain-2"]
    d = Deployment(tmp_path, devices=names, spare=(), labels=False)
    try:
        assert all("cluster" not in np.load(f).files for f in d.files)
        since = time.time()
        run_id = deploy.submit(d.home, d.scenario, tmp_path / "runs")
        run_dir = deploy.find_run_dir(tmp_path / "runs", d.scenario["run"]["name"], since)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # stop the run once round 1 is checkpointed
            path = run_dir / CHECKPOINT  # written atomically after every round
            if path.is_file() and pickle.loads(path.read_bytes())["round"] >= 1:
                break
            assert deploy.run_status(d.home, run_id).get("status") not in deploy.FINISHED, (
                deploy.run_status(d.home, run_id), load_history(run_dir).get("error"))
            time.sleep(0.2)
        else:
            pytest.fail(f"no checkpoint of round 1 within 180 s; history: {load_history(run_dir)}")
        deploy.stop_run(d.home, run_id)
        assert deploy.wait_run(d.home, run_id, timeout=60)["status"] == "finished:stopped"
        assert load_history(run_dir)["status"] != "finished"
        resumed = umbel("deploy", "run", "--resume", str(run_dir), "--home", str(d.home.root),
                         "--out", str(tmp_path / "runs"), "--timeout", "240")
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out
    finally:
        deploy.stop_all(d.home, timeout=1)
    history = load_history(run_dir)
    assert history["status"] == "finished", history.get("error")
    rows = history["strategies"]["clustered-fedavg"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    no_labels_no_drops(rows, clients=3)
    starts = [e.run_started for e in monitor.read_events(run_dir) if e.HasField("run_started")]
    assert len(starts) == 2 and starts[1].resumed_from_round >= 1
    assert (run_dir / CHECKPOINT).is_file()
    labelled_status, labelled_dir = labelled_run
    assert labelled_status["status"] == "finished:completed", labelled_status
    np.testing.assert_allclose(load_models(run_dir, "clustered-fedavg")["w"],
                               load_models(labelled_dir, "clustered-fedavg")["w"], rtol=0, atol=1e-12)
