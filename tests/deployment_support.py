"""What the loopback deployment tests share: a SuperLink with TLS and device authentication
and its registered devices (``Deployment``), and a whole ``umbel data export`` + ``umbel deploy
run`` through the CLI (``deploy_with_the_cli``). Real Flower processes, nothing mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server import monitor
from deployment import deploy
from deployment.certs import make_certs
from server.record import load_models
from simulations.launcher import arm_label
from simulations.reference import Reference
from simulations.scenarios import load_scenario

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


def umbel(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "umbel"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def no_labels_no_drops(rows: list[dict], clients: int) -> None:
    """Every round: all clients replied, nothing dropped or missing, no label-based metric."""
    for row in rows[1:]:
        assert row["clients"] == clients, row
        assert row.get("dropped", 0) == 0 and "dropped_replies" not in row, row
        assert not row.get("missing_nodes"), row
    assert not [k for row in rows for k in row if k.startswith("misclustering") or k == "ari"]


def deploy_with_the_cli(tmp_path: Path, scenario: str, overrides: list[str], devices: list[str]) -> Path:
    """`umbel data export`, a SuperLink and a device per client file, `umbel deploy run`;
    returns the run record (after stopping every process)."""
    export = umbel("data", "export", scenario, str(tmp_path / "data"), *sets(overrides))
    out, _ = export.communicate(timeout=120)
    assert export.returncode == 0, out
    d = Deployment(tmp_path, load_scenario(scenario, overrides), devices=devices, spare=(), data=tmp_path / "data")
    assert len(d.files) == len(devices) and all("cluster" not in np.load(f).files for f in d.files)
    try:
        run = umbel("deploy", "run", scenario, *sets(overrides), "--home", str(d.home.root),
                     "--out", str(tmp_path / "runs"), "--timeout", "300")
        out, _ = run.communicate(timeout=360)
        assert run.returncode == 0, out
    finally:
        deploy.stop_all(d.home, timeout=1)
    return next((tmp_path / "runs").glob(f"{load_scenario(scenario, overrides)['run']['name']}-*"))


def matches_the_simulation(run_dir: Path, scenario: dict, strategy: str, rows: list[dict], metrics: tuple[str, ...],
                           variant: str = "", atol: float = 1e-9) -> dict:
    """The deployed run's final models and its scores of every round are the in-process
    simulation's (to ``atol``); returns the deployed models for further checks."""
    simulated = Reference(scenario).run(strategy, variant=variant)
    deployed = load_models(run_dir, arm_label(strategy, variant))
    assert sorted(deployed) == sorted(simulated[-1]["models"])
    for name, value in simulated[-1]["models"].items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=atol, err_msg=name)
    assert len(simulated) == len(rows)
    for row, ref in zip(rows, simulated):
        for metric in metrics:
            assert row[metric] == pytest.approx(ref[metric], abs=atol), (row["round"], metric)
    return deployed
