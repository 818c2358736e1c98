"""Deployment with real processes on loopback: Flower's SuperLink and SuperNodes started by
``deployment.deploy`` with TLS and device authentication, and ``umbel run`` processes killed
and resumed. Nothing of Flower is mocked."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server import monitor
from server.record import CHECKPOINT, load_history, load_models
from deployment import deploy
from deployment.certs import make_certs
from simulations.launcher import arm_labels, simulate
from simulations.reference import Reference
from simulations.scenarios import load_scenario

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
DEVICES = ["dev-0", "dev-1", "dev-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink (TLS, device authentication) and registered, running devices, one per
    exported client file of ``scenario`` (default: ``deploy-tiny``'s three, exported with
    their true clusters, plus the keys "bad", "rogue" and "no-ca" the tests misuse)."""

    def __init__(self, root: Path, scenario: dict | None = None, devices: list[str] = DEVICES,
                 spare: tuple[str, ...] = ("bad", "rogue", "no-ca"), labels: bool = True,
                 data: Path | None = None) -> None:
        self.root = root
        self.home = deploy.Home(root / "deploy")
        self.scenario = scenario or load_scenario("deploy-tiny")
        self.data = data or root / "data"
        self.files = (deploy.export_device_data(self.scenario, self.data, labels=labels) if data is None
                      else sorted(data.glob("client-*.npz")))
        make_certs(self.home.certs, ["127.0.0.1"], [*devices, *spare])
        if "no-ca" in spare:
            make_certs(root / "other-ca", ["127.0.0.1"])  # a CA the SuperLink does not use
        self.link = f"127.0.0.1:{_free_port()}"
        deploy.start_superlink(self.home, port=int(self.link.rpartition(":")[2]))
        for name in [*devices, *(s for s in spare if s != "rogue")]:  # "rogue" stays unregistered
            deploy.register_device(self.home, self.home.certs / "devices" / f"{name}.pub")
        self.ports: dict[str, int] = {}
        for i, name in enumerate(devices):
            self.start(name, self.files[i])

    def start(self, name: str, data: Path, **kwargs) -> deploy.Started:
        """A device polling every 0.5 s with Flower's shortest heartbeat (10 s), so a
        crashed device can rejoin 20 s later; timings do not change results."""
        port = self.ports.setdefault(name, _free_port())
        kwargs = {"poll": 0.5, "heartbeat": 10.0, **kwargs}
        return deploy.start_supernode(self.home, name, data, self.link, port, **kwargs)

    def run(self, scenario: dict, on_event=None, timeout: float = 300.0) -> tuple[dict, Path]:
        """Submit, follow the monitor (``on_event(event)``), wait; (status, run dir)."""
        since = time.time()
        run_id = deploy.submit(self.home, scenario, self.root / "runs")
        run_dir = deploy.find_run_dir(self.root / "runs", scenario["run"]["name"], since)
        deadline = time.monotonic() + 60
        while not (run_dir / monitor.ADDRESS_FILE).is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = (run_dir / monitor.ADDRESS_FILE).read_text().strip()
        for event in monitor.watch(address, timeout=timeout):
            if on_event:
                on_event(event)
        return deploy.wait_run(self.home, run_id, timeout=60), run_dir


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
        "run.name='deploy-kill'", "run.strategies=['ifca']", "run.rounds=5", "run.round_timeout=20.0"])
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


def _umbel(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "umbel"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


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
    full = _umbel(*args, "--out", str(tmp_path / "full"))
    full_dir = run_dir_of(tmp_path / "full")
    watcher = _umbel("watch", str(full_dir))
    streamed = list(monitor.watch((full_dir / monitor.ADDRESS_FILE).read_text().strip(), timeout=120))
    assert full.wait(timeout=120) == 0 and watcher.wait(timeout=30) == 0
    stored = monitor.read_events(full_dir)
    assert streamed == stored
    rounds = [(e.round_finished.arm, e.round_finished.round) for e in stored if e.HasField("round_finished")]
    assert rounds == [(a, r) for a in ("clustered-fedavg", "fedavg") for r in range(9)]
    lines = watcher.stdout.read().splitlines()
    assert len(lines) == len(stored) and "run finished" in lines[-1]

    # Killed (SIGKILL) once round 3 of the first arm is recorded, then resumed.
    killed = _umbel(*args, "--out", str(tmp_path / "killed"))
    killed_dir = run_dir_of(tmp_path / "killed")
    for event in monitor.watch((killed_dir / monitor.ADDRESS_FILE).read_text().strip(), timeout=120):
        if event.HasField("round_finished") and event.round_finished.round == 3:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=30)
    assert load_history(killed_dir)["status"] == "running"  # it never got to say otherwise
    resumed = _umbel("run", "--resume", str(killed_dir), "--ray-address", ray_cluster)
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()
    history = load_history(killed_dir)
    assert history["status"] == "finished"
    starts = [e.run_started for e in monitor.read_events(killed_dir) if e.HasField("run_started")]
    assert len(starts) == 2 and starts[1].resumed_from_round >= 1
    for arm in ("clustered-fedavg", "fedavg"):
        np.testing.assert_allclose(load_models(killed_dir, arm)["w"], load_models(full_dir, arm)["w"],
                                   rtol=0, atol=1e-12)
        assert len(history["strategies"][arm]) == 9


# ---- every workload with client data, on devices without cluster labels ---------------

def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _no_labels_no_drops(rows: list[dict], clients: int) -> None:
    """Every round: all clients replied, nothing dropped or missing, no label-based metric."""
    for row in rows[1:]:
        assert row["clients"] == clients, row
        assert row.get("dropped", 0) == 0 and "dropped_replies" not in row, row
        assert not row.get("missing_nodes"), row
    assert not [k for row in rows for k in row if k.startswith("misclustering") or k == "ari"]


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
        resumed = _umbel("deploy", "run", "--resume", str(run_dir), "--home", str(d.home.root),
                         "--out", str(tmp_path / "runs"), "--timeout", "240")
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out
    finally:
        deploy.stop_all(d.home, timeout=1)
    history = load_history(run_dir)
    assert history["status"] == "finished", history.get("error")
    rows = history["strategies"]["clustered-fedavg"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    _no_labels_no_drops(rows, clients=3)
    starts = [e.run_started for e in monitor.read_events(run_dir) if e.HasField("run_started")]
    assert len(starts) == 2 and starts[1].resumed_from_round >= 1
    assert (run_dir / CHECKPOINT).is_file()
    labelled_status, labelled_dir = labelled_run
    assert labelled_status["status"] == "finished:completed", labelled_status
    np.testing.assert_allclose(load_models(run_dir, "clustered-fedavg")["w"],
                               load_models(labelled_dir, "clustered-fedavg")["w"], rtol=0, atol=1e-12)


def _deploy_with_the_cli(tmp_path: Path, scenario: str, overrides: list[str], devices: list[str]) -> Path:
    """`umbel data export`, a SuperLink and a device per client file, `umbel deploy run`;
    returns the run record (after stopping every process)."""
    export = _umbel("data", "export", scenario, str(tmp_path / "data"), *_sets(overrides))
    out, _ = export.communicate(timeout=120)
    assert export.returncode == 0, out
    d = Deployment(tmp_path, load_scenario(scenario, overrides), devices=devices, spare=(), data=tmp_path / "data")
    assert len(d.files) == len(devices) and all("cluster" not in np.load(f).files for f in d.files)
    try:
        run = _umbel("deploy", "run", scenario, *_sets(overrides), "--home", str(d.home.root),
                     "--out", str(tmp_path / "runs"), "--timeout", "300")
        out, _ = run.communicate(timeout=360)
        assert run.returncode == 0, out
    finally:
        deploy.stop_all(d.home, timeout=1)
    return next((tmp_path / "runs").glob(f"{load_scenario(scenario, overrides)['run']['name']}-*"))


def test_umbel_deploy_run_carries_active_learning_to_devices(tmp_path):
    """Two devices, two selection rules (two arms), a label query in round 2."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "active_learning.rules=['random', 'entropy']", "active_learning.rounds_per_cycle=1",
                 "active_learning.initial_labels=8", "active_learning.budget=4",
                 "active_learning.centralised=false", "train.local_steps=5"]
    run_dir = _deploy_with_the_cli(tmp_path, "active-learning", overrides, ["al-0", "al-1"])
    history = load_history(run_dir)
    assert history["status"] == "finished"
    assert sorted(history["strategies"]) == sorted(arm_labels(load_scenario("active-learning", overrides)))
    for arm, rows in history["strategies"].items():
        assert [r["round"] for r in rows] == [0, 1, 2], arm
        assert all(np.isfinite(r["accuracy"]) and 0 <= r["accuracy"] <= 1 for r in rows), arm
        assert rows[2]["queried"] == 4, arm  # the round-2 query: the federation's budget
        _no_labels_no_drops(rows, clients=2)


def test_umbel_deploy_run_carries_koopman_to_devices_without_viscosity_groups(tmp_path):
    """Two devices of two viscosity groups on two grids; IFCA's two models, no labels."""
    overrides = ["federation.clients=2", "koopman.viscosities=[0.01, 0.05]", "koopman.grids=[32, 64]",
                 "koopman.train_per_client=2", "koopman.test_per_viscosity=2", "koopman.eval_grid=32",
                 "koopman.solver_points=64", "koopman.modes=4", "koopman.width=8", "koopman.power=2",
                 "koopman.batch_size=2", "koopman.rollout_horizons=1", "koopman.baselines=[]",
                 "anchors.count=2", "run.strategies=['ifca']", "run.rounds=2", "run.round_timeout=120.0",
                 "train.local_steps=2"]
    run_dir = _deploy_with_the_cli(tmp_path, "koopman-burgers", overrides, ["kp-0", "kp-1"])
    history = load_history(run_dir)
    assert history["status"] == "finished"
    assert list(history["strategies"]) == ["ifca"]
    rows = history["strategies"]["ifca"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(np.isfinite(r["rel_l2"]) for r in rows)
    _no_labels_no_drops(rows, clients=2)


def test_umbel_deploy_run_carries_ccgc_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices, each smoothing its own subgraph from its file (no node classes); FedAvg
    through a warm-up round and a cluster-guided one ends with the in-process simulation's
    encoders and centres, and the server's evaluator scores every round alike."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "ccgc.nodes=200", "ccgc.degree=20", "ccgc.feature_dim=16", "ccgc.dims=16",
                 "ccgc.init_sample=100", "ccgc.warmup_rounds=1", "ccgc.baselines=[]", "train.local_steps=3"]
    run_dir = _deploy_with_the_cli(tmp_path, "ccgc-clustering", overrides, ["cg-0", "cg-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "edges", "features", "node_ids"]
               for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    assert list(history["strategies"]) == ["fedavg"]
    rows = history["strategies"]["fedavg"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    _no_labels_no_drops(rows, clients=2)
    simulated = Reference(load_scenario("ccgc-clustering", overrides)).run("fedavg")
    deployed = load_models(run_dir, "fedavg")
    assert sorted(deployed) == sorted(simulated[-1]["models"])
    for name, value in simulated[-1]["models"].items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=1e-9, err_msg=name)
    assert len(simulated) == len(rows)
    for row, ref in zip(rows, simulated):
        for metric in ("nmi", "acc", "node_ari", "f1", "refit_nmi", "cluster_loss"):
            assert row[metric] == pytest.approx(ref[metric], abs=1e-9), (row["round"], metric)


def test_umbel_deploy_run_carries_snf_pruning_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices through SNF's search and pruned phases (dense FedAvg is any FedAvg): round 1
    the search (each device scores the candidates on its own validation digits), round 2
    pruned to the best-scored widths with masks every device shares; the models and the
    evaluator's scores are the in-process simulation's."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "snf.methods=['searched']", "snf.cuts=[0.5]", "snf.widths=[4, 8, 8]", "snf.test_size=200",
                 "snf.test_views=1", "snf.candidates=2", "snf.proxy_steps=1", "snf.dense_rounds=0",
                 "train.local_steps=2"]
    run_dir = _deploy_with_the_cli(tmp_path, "snf-pruning", overrides, ["snf-0", "snf-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "images", "targets", "validation"]
               for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    rows = history["strategies"]["fedavg/searched@0.5"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    _no_labels_no_drops(rows, clients=2)
    assert rows[1]["flops_cut"] == 0.0 and rows[2]["flops_cut"] >= 0.5  # pruned after the search round
    simulated = Reference(load_scenario("snf-pruning", overrides)).run("fedavg", variant="searched@0.5")
    deployed = load_models(run_dir, "fedavg/searched@0.5")
    assert sorted(deployed) == sorted(simulated[-1]["models"])
    for name, value in simulated[-1]["models"].items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=1e-6, err_msg=name)
    assert deployed["snf.scores"].max() > 0  # the devices' scores reached the server
    for row, ref in zip(rows, simulated):
        for metric in ("accuracy", "mflops", "width_1"):
            assert row[metric] == pytest.approx(ref[metric], abs=1e-6), (row["round"], metric)


def test_umbel_deploy_run_carries_mgtab_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices, each training RGCN on its own community (its users' labels and the
    relations among them, read from its file); FedAvg ends with the in-process simulation's
    models, and the server's evaluator scores every round alike."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "run.strategies=['fedavg']", "mgtab.nodes=200", "mgtab.communities=2", "mgtab.text_dim=8",
                 "mgtab.hidden=8", "anchors.count=1", "mgtab.baselines=[]", "train.local_steps=3"]
    run_dir = _deploy_with_the_cli(tmp_path, "mgtab-bots", overrides, ["mg-0", "mg-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "edge_type", "edges", "features", "node_ids", "split",
                                            "y_bot", "y_stance"] for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    rows = history["strategies"]["fedavg"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    _no_labels_no_drops(rows, clients=2)
    simulated = Reference(load_scenario("mgtab-bots", overrides)).run("fedavg")
    deployed = load_models(run_dir, "fedavg")
    assert sorted(deployed) == sorted(simulated[-1]["models"])
    for name, value in simulated[-1]["models"].items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=1e-9, err_msg=name)
    assert deployed["age"].ravel().tolist() == [2.0]
    for row, ref in zip(rows, simulated):
        for metric in ("f1_bot", "acc_bot", "f1_stance", "acc_stance", "round_f1_bot", "val_score", "train_loss"):
            assert row[metric] == pytest.approx(ref[metric], abs=1e-9), (row["round"], metric)
