"""Deployment with real processes on loopback: Flower's SuperLink and SuperNodes started by
``deployment.deploy`` with TLS and device authentication, and ``umbel run`` processes killed
and resumed. Nothing of Flower is mocked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server import monitor
from server.record import load_history, load_models
from deployment import deploy
from deployment.certs import make_certs
from simulations.launcher import simulate
from simulations.scenarios import load_scenario

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
DEVICES = ["dev-0", "dev-1", "dev-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink (TLS, device authentication) and three registered, running devices."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = deploy.Home(root / "deploy")
        self.scenario = load_scenario("deploy-tiny")
        self.data = root / "data"
        self.files = deploy.export_device_data(self.scenario, self.data)
        make_certs(self.home.certs, ["127.0.0.1"], [*DEVICES, "bad", "rogue", "no-ca"])
        make_certs(root / "other-ca", ["127.0.0.1"])  # a CA the SuperLink does not use
        self.link = f"127.0.0.1:{_free_port()}"
        deploy.start_superlink(self.home, port=int(self.link.rpartition(":")[2]))
        for name in [*DEVICES, "bad", "no-ca"]:  # "rogue" stays unregistered
            deploy.register_device(self.home, self.home.certs / "devices" / f"{name}.pub")
        self.ports: dict[str, int] = {}
        for i, name in enumerate(DEVICES):
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


def test_three_devices_with_tls_and_authentication_match_the_simulation(deployment, ray_cluster, tmp_path):
    status, run_dir = deployment.run(deployment.scenario)
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
    for started, says in ((rogue, "Failed to activate SuperNode"), (no_ca, "CERTIFICATE_VERIFY_FAILED")):
        with pytest.raises(deploy.DeployError, match="exited"):
            deploy.still_running(started, grace=30)
        assert says in started.log.read_text()


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
        "run.name='deploy-kill'", "run.strategies=['ifca']", "run.rounds=4", "run.round_timeout=20.0"])
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
