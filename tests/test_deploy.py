"""Deployment pieces without processes: certificates, device files (every workload's format) and
state, the monitor's event log and gRPC service, checkpoints, the run config."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from client.device import DeviceState, data_files
from server import monitor
from server.run_config import ScenarioError, scenario_from_run_config
from deployment.certs import CertError, make_certs
from deployment.deploy import DeployError, app_dir, export_device_data, run_config, stage_app
from simulations.scenarios import load_scenario
from workloads import workload_class
from workloads.device_files import DeviceDataError

ROOT = Path(__file__).resolve().parents[1]


# ---- certificates --------------------------------------------------------------------

def test_the_staged_app_bundles_to_the_checkouts_own_fab(tmp_path):
    """`umbel deploy run` hands Flower a copy of the app's files instead of the checkout (whose
    .venv Flower would walk): the bundle is byte for byte the one Flower builds from the checkout,
    and a deployment home inside the checkout is not copied into itself."""
    from flwr.cli.build import build_fab_from_disk

    checkout = tmp_path / "checkout"
    shutil.copytree(app_dir(), checkout, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    (checkout / "deploy" / "flwr").mkdir(parents=True)  # the default home, gitignored
    (checkout / "deploy" / "flwr" / "installed.py").write_text("x = 1\n")
    (checkout / "notes").mkdir()
    (checkout / "notes" / "idea.py").write_text("y = 2\n")  # not ignored: Flower bundles it
    staged = stage_app(checkout / "deploy" / "app", source=checkout)
    assert not (staged / "deploy").exists() and (staged / "notes" / "idea.py").is_file()
    assert build_fab_from_disk(staged) == build_fab_from_disk(checkout)
    # a home under any other name in the checkout: pruned by its path, so never copied into itself
    elsewhere = stage_app(checkout / "my-home" / "app-1" / "app", source=checkout)
    assert not (elsewhere / "my-home").exists() and (elsewhere / "notes" / "idea.py").is_file()


def test_certs_make_a_ca_a_server_certificate_for_its_hosts_and_device_keys(tmp_path):
    made = make_certs(tmp_path, ["127.0.0.1", "link.example"], ["dev-0"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Flower reads OpenSSH keys on a NIST curve; private keys are the owner's alone.
    key = load_ssh_private_key((tmp_path / "devices/dev-0").read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP384R1)
    assert load_ssh_public_key((tmp_path / "devices/dev-0.pub").read_bytes()) == key.public_key()
    assert (tmp_path / "devices/dev-0").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    assert len(made["written"]) == 6

    # A second call keeps the CA and the device key, adds a device.
    again = make_certs(tmp_path, ["127.0.0.1"], ["dev-0", "dev-1"])
    assert tmp_path / "ca.crt" in again["kept"] and tmp_path / "devices/dev-0" in again["kept"]
    assert x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()) == ca
    assert (tmp_path / "devices/dev-1.pub").is_file()


@pytest.mark.parametrize("hosts, devices, field", [
    (["bad host"], [], "--host"), (["127.0.0.1"], ["../x"], "--device"), (["127.0.0.1"], [""], "--device"),
])
def test_certs_refuse_bad_names(tmp_path, hosts, devices, field):
    with pytest.raises(CertError, match=field):
        make_certs(tmp_path, hosts, devices)


# ---- device data files ---------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    scenario = load_scenario("deploy-tiny")
    folder = tmp_path_factory.mktemp("device-data")
    return scenario, export_device_data(scenario, folder)


def test_exported_device_files_hold_exactly_the_simulated_clients_data(exported):
    scenario, files = exported
    workload = workload_class("mixed_regression")(scenario)
    assert [f.name for f in files] == ["client-0.npz", "client-1.npz", "client-2.npz"]
    simulated = workload.client_data(np.arange(3))
    for cid in range(3):
        one = workload.read_device_files([files[cid]])
        ref = workload.client_data(np.array([cid]))
        assert one.client_ids.tolist() == [cid]
        np.testing.assert_array_equal(one.x, ref.x)
        np.testing.assert_array_equal(one.y, ref.y)
        assert one.labels is None  # real devices know no cluster
    folder = workload.read_device_files(data_files(str(files[0].parent)))  # a device with three clients
    np.testing.assert_array_equal(folder.x, simulated.x)
    assert (files[0].parent / "scenario.toml").is_file()


def _bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    cases = {}
    truncated = folder / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (truncated, "not a readable .npz")
    for name, change, message in [
        ("wrong-dim", {"x": arrays["x"][:, :3]}, "3 columns; this scenario's dim is 5"),
        ("flat-x", {"x": arrays["x"].ravel()}, "'x' has shape"),
        ("short-y", {"y": arrays["y"][:-1]}, "need the same number"),
        ("nan", {"y": np.where(np.arange(len(arrays["y"])) == 0, np.nan, arrays["y"])}, "NaN"),
        ("foreign-id", {"client_id": np.int64(99)}, "outside this scenario's"),
        ("no-y", {"y": None}, "missing array 'y'"),
    ]:
        path = folder / f"{name}.npz"
        np.savez(path, **{k: v for k, v in {**arrays, **change}.items() if v is not None})
        cases[name] = (path, message)
    cases["missing"] = (folder / "nowhere.npz", "no such file")
    return cases


def test_bad_device_files_raise_errors_that_name_the_file_and_the_problem(exported, tmp_path):
    scenario, files = exported
    workload = workload_class("mixed_regression")(scenario)
    for name, (path, message) in _bad_files(tmp_path, files[0]).items():
        with pytest.raises(DeviceDataError) as err:
            workload.read_device_files(data_files(str(path)))
        assert message in str(err.value), name
        assert str(path) in str(err.value), name


def test_device_files_carry_no_cluster_unless_exported_with_labels(exported, tmp_path):
    scenario, files = exported
    with np.load(files[1]) as f:
        assert sorted(f.files) == ["client_id", "x", "y"]
    labelled = export_device_data(scenario, tmp_path / "labelled", labels=True)
    workload = workload_class("mixed_regression")(scenario)
    data = workload.read_device_files(labelled)
    assert data.labels.tolist() == workload.client_data(np.arange(3)).labels.tolist()
    np.testing.assert_array_equal(data.x, workload.read_device_files(files).x)
    with np.load(labelled[0]) as f:  # a label outside the scenario's clusters is named
        np.savez(tmp_path / "c.npz", **{**{k: f[k] for k in f.files}, "cluster": np.int64(7)})
    with pytest.raises(DeviceDataError, match=r"c\.npz: cluster 7 is outside the scenario's clusters"):
        workload.read_device_files([tmp_path / "c.npz"])
    with pytest.raises(DeployError, match="--labels: workload active_learning has no true clusters"):
        export_device_data(load_scenario("active-learning"), tmp_path / "al", labels=True)


# Small scenarios of the other workloads with client data (seconds to generate).
SMALL = {
    "active_learning": ("active-learning", [
        "federation.clients=4", "federation.cohort_size=2", "run.rounds=3", "active_learning.rules=['random']",
        "active_learning.initial_labels=8", "active_learning.budget=4", "active_learning.centralised=false"]),
    "koopman_burgers": ("koopman-burgers", [
        "federation.clients=2", "koopman.viscosities=[0.01, 0.05]", "koopman.grids=[32, 64]",
        "koopman.train_per_client=2", "koopman.test_per_viscosity=2", "koopman.eval_grid=32",
        "koopman.solver_points=64", "koopman.modes=4", "koopman.width=8", "koopman.power=2",
        "koopman.baselines=[]", "anchors.count=2", "run.rounds=2"]),
    "backdoor_distillation": ("backdoor-naive", ["federation.clients=3"]),
    "ccgc_clustering": ("ccgc-clustering", [
        "federation.clients=3", "ccgc.nodes=120", "ccgc.degree=20", "ccgc.feature_dim=16", "ccgc.dims=8",
        "ccgc.init_sample=60", "ccgc.baselines=[]", "run.rounds=2"]),
    "mgtab_bots": ("mgtab-bots", [
        "federation.clients=3", "mgtab.communities=3", "mgtab.nodes=150", "mgtab.text_dim=8", "mgtab.hidden=8",
        "mgtab.partition='random'", "anchors.count=2", "mgtab.baselines=[]", "run.rounds=2"]),
    "snf_pruning": ("snf-pruning", [
        "federation.clients=3", "snf.widths=[4, 8, 8]", "snf.test_size=200", "snf.test_views=1", "snf.cuts=[0.5]",
        "snf.dense_rounds=1", "run.rounds=3"]),
}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _fields(data) -> dict[str, np.ndarray]:
    """A cohort's array fields (None for unknown ones), to compare two cohorts exactly."""
    import dataclasses

    return {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}


@pytest.mark.parametrize("workload_name", list(SMALL))
def test_every_workload_exports_device_files_that_read_back_as_the_simulated_clients(workload_name, tmp_path):
    name, overrides = SMALL[workload_name]
    scenario = load_scenario(name, overrides)
    files = export_device_data(scenario, tmp_path)
    workload = workload_class(workload_name)(scenario)
    n = scenario["federation"]["clients"]
    assert [f.name for f in files] == [f"client-{c}.npz" for c in range(n)]
    assert all("cluster" not in _arrays(f) for f in files)  # no labels on devices
    for read, simulated in [(workload.read_device_files(files[::-1]), workload.client_data(np.arange(n))),
                            (workload.read_device_files([files[1]]), workload.client_data(np.array([1])))]:
        for field, value in _fields(simulated).items():
            got = _fields(read)[field]
            if field == "labels":  # Koopman's viscosity group, CCGC's node classes: unknown on a device
                assert got is None, field
            elif field == "viscosity":  # not in the files unless the model reads it
                assert np.isnan(got).all(), field
            elif value is None or np.isscalar(value):
                assert got == value, field
            else:
                np.testing.assert_array_equal(got, value, err_msg=field)


def _bad_cases(workload_name: str, good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files the test writes from a good one: (path, what the error must say)."""
    arrays = _arrays(good)
    changes = {
        "another-scenario-id": ({"client_id": np.int64(99)}, "client_id 99 is outside this scenario's"),
        "id-not-scalar": ({"client_id": np.array([0, 1])}, "'client_id' has shape (2,)"),
    }
    if workload_name == "active_learning":
        images = arrays["images"]
        changes |= {
            "no-images": ({"images": None}, "missing array 'images'"),
            "flat-images": ({"images": images.reshape(len(images), -1)}, "'images' has shape"),
            "wrong-side": ({"images": images[:, :, :4]}, "expected (n, 1, 8, 8)"),
            "short-targets": ({"targets": arrays["targets"][:-1]}, "'targets' has shape"),
            "raw-pixels": ({"images": images * 16}, "expected [0, 1]"),
            "class-11": ({"targets": np.full_like(arrays["targets"], 11)}, "classes 0-9"),
            "nothing-labeled": ({"labeled": np.zeros_like(arrays["labeled"])}, "marks no image"),
            "nan": ({"images": np.where(images == images.max(), np.nan, images)}, "NaN"),
        }
    elif workload_name == "koopman_burgers":
        fields = arrays["fields"]
        changes |= {
            "no-fields": ({"fields": None}, "missing array 'fields'"),
            "one-trajectory-flat": ({"fields": fields[0]}, "'fields' has shape"),
            "other-steps": ({"fields": np.concatenate([fields, fields], axis=1)},
                            "4 snapshots per trajectory; this scenario's koopman.steps needs 2"),
            "coarse-grid": ({"fields": fields[:, :, :4]}, "4-point grid is too coarse"),
            "nan": ({"fields": np.where(fields > 0, np.nan, fields)}, "NaN"),
            "bad-viscosity": ({"viscosity": np.float64(-1.0)}, "'viscosity' must be a positive number"),
        }
    elif workload_name == "ccgc_clustering":
        features, edges, nodes = arrays["features"], arrays["edges"], arrays["node_ids"]
        changes |= {
            "no-edges": ({"edges": None}, "missing array 'edges'"),
            "flat-edges": ({"edges": edges.ravel()}, "'edges' has shape"),
            "edge-triples": ({"edges": np.concatenate([edges, edges[:1]])}, "expected (2, n)"),
            "global-edge-ids": ({"edges": nodes[edges]}, "local node indices 0.."),
            "float-edges": ({"edges": edges.astype(np.float64)}, "'edges' holds float64"),
            "other-dim": ({"features": features[:, :3]}, "3 columns; this scenario's feature dimension is 16"),
            "no-nodes": ({"features": features[:0], "node_ids": nodes[:0], "edges": edges[:, :0]},
                         "holds no nodes"),
            "short-node-ids": ({"node_ids": nodes[:-1]}, "'node_ids' has shape"),
            "node-twice": ({"node_ids": np.concatenate([nodes[:1], nodes[:-1]])}, "names a node twice"),
            "foreign-node": ({"node_ids": nodes + 120}, "must lie in the graph's 0..119"),
            "nan": ({"features": np.where(features > 1, np.nan, features)}, "NaN"),
        }
    elif workload_name == "mgtab_bots":
        features, edges, nodes, split = arrays["features"], arrays["edges"], arrays["node_ids"], arrays["split"]
        changes |= {
            "no-edge-types": ({"edge_type": None}, "missing array 'edge_type'"),
            "short-edge-types": ({"edge_type": arrays["edge_type"][:-1]}, "'edge_type' has shape"),
            "relation-7": ({"edge_type": np.full_like(arrays["edge_type"], 7)}, "'edge_type' must be classes 0-6"),
            "global-edge-ids": ({"edges": nodes[edges] + 50}, "local user indices 0.."),
            "other-width": ({"features": features[:, :3]}, "'features' has shape"),
            "bot-2": ({"y_bot": np.full_like(arrays["y_bot"], 2)}, "'y_bot' must be classes 0-1"),
            "short-stance": ({"y_stance": arrays["y_stance"][:-1]}, "'y_stance' has shape"),
            "nothing-to-train": ({"split": np.full_like(split, 2)}, "no training users"),
            "user-twice": ({"node_ids": np.concatenate([nodes[:1], nodes[:-1]])}, "names a user twice"),
            "foreign-user": ({"node_ids": nodes + 150}, "must be integers in the graph's 0..149"),
            "nan": ({"features": np.where(features > 0.5, np.nan, features)}, "NaN"),
        }
    elif workload_name == "snf_pruning":
        images, validation = arrays["images"], arrays["validation"]
        changes |= {
            "no-validation": ({"validation": None}, "missing array 'validation'"),
            "upsampled": ({"images": np.repeat(np.repeat(images, 2, axis=2), 2, axis=3)}, "expected (n, 1, 8, 8)"),
            "short-targets": ({"targets": arrays["targets"][:-1]}, "'targets' has shape"),
            "raw-pixels": ({"images": images * 16}, "expected [0, 1]"),
            "class-10": ({"targets": np.full_like(arrays["targets"], 10)}, "classes 0-9"),
            "all-validation": ({"validation": np.ones_like(validation)}, "leave at least one for training"),
            "int-validation": ({"validation": validation.astype(np.int64)}, "'validation' holds int64"),
            "nan": ({"images": np.where(images == images.max(), np.nan, images)}, "NaN"),
        }
    else:
        images = arrays["images"]
        changes |= {
            "no-targets": ({"targets": None}, "missing array 'targets'"),
            "colour": ({"images": np.repeat(images, 3, axis=1)}, "expected (n, 1, 8, 8)"),
            "short-targets": ({"targets": arrays["targets"][:-1]}, "'targets' has shape"),
            "raw-pixels": ({"images": images * 0 + 16.0}, "raw pixels?"),
            "class-10": ({"targets": np.full_like(arrays["targets"], 10)}, "classes 0-9"),
        }
    cases = {}
    for case, (change, message) in changes.items():
        path = folder / f"{case}.npz"
        np.savez(path, **{k: v for k, v in {**arrays, **change}.items() if v is not None})
        cases[case] = (path, message)
    if workload_name == "ccgc_clustering":  # a device folder: another client holding the same nodes
        (folder / "shared").mkdir()
        np.savez(folder / "shared" / "a.npz", **arrays)
        np.savez(folder / "shared" / "b.npz", **{**arrays, "client_id": np.int64(2)})
        cases["node-in-two-files"] = (folder / "shared", f"node {arrays['node_ids'][0]} is also in")
    truncated = folder / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (truncated, "not a readable .npz")
    cases["missing"] = (folder / "nowhere.npz", "no such file")
    return cases


@pytest.mark.parametrize("workload_name", list(SMALL))
def test_bad_device_files_of_every_workload_name_the_file_and_the_problem(workload_name, tmp_path):
    name, overrides = SMALL[workload_name]
    scenario = load_scenario(name, overrides)
    files = export_device_data(scenario, tmp_path / "good")
    workload = workload_class(workload_name)(scenario)
    for case, (path, message) in _bad_cases(workload_name, files[0], tmp_path).items():
        with pytest.raises(DeviceDataError) as err:
            workload.read_device_files(data_files(str(path)))
        assert message in str(err.value) and str(path) in str(err.value), (case, str(err.value))
    (tmp_path / "copy.npz").write_bytes(files[0].read_bytes())
    with pytest.raises(DeviceDataError, match="client_id 0 is also in"):  # one client in two files
        workload.read_device_files([files[0], tmp_path / "copy.npz"])


def test_koopman_device_files_carry_the_viscosity_only_when_the_model_reads_it(tmp_path):
    name, overrides = SMALL["koopman_burgers"]
    scenario = load_scenario(name, [*overrides, "koopman.viscosity_channel=true"])
    files = export_device_data(scenario, tmp_path)
    workload = workload_class("koopman_burgers")(scenario)
    assert _arrays(files[1])["viscosity"] == 0.05
    data = workload.read_device_files(files)
    assert data.viscosity.tolist() == [0.01, 0.05] and data.labels is None
    np.savez(tmp_path / "blind.npz", **{k: v for k, v in _arrays(files[0]).items() if k != "viscosity"})
    with pytest.raises(DeviceDataError, match="blind.npz: missing 'viscosity'"):
        workload.read_device_files([tmp_path / "blind.npz"])
    labelled = export_device_data(scenario, tmp_path / "labelled", labels=True)
    assert workload.read_device_files(labelled).labels.tolist() == [0, 1]


def test_device_state_survives_a_restart_and_a_damaged_file_starts_over(tmp_path):
    state = DeviceState(str(tmp_path / "state"))
    state.record_round("clustered-fedavg", 1, {7: 2})
    state.record_round("clustered-fedavg", 2, {7: 1})
    again = DeviceState(str(tmp_path / "state"))  # a new process after a restart
    assert again.arm("clustered-fedavg") == {"rounds": 2, "last_round": 2, "clusters": {"7": 1}}
    again.path.write_text("{not json")
    assert DeviceState(str(tmp_path / "state")).arm("clustered-fedavg") == {}


# ---- run config for `flwr run` -------------------------------------------------------

@pytest.mark.parametrize("name", ["deploy-tiny", "active-learning", "koopman-burgers", "backdoor-doorping"])
def test_the_run_config_carries_the_whole_scenario_and_flower_accepts_its_keys(name, tmp_path):
    """`umbel deploy run` sends the resolved scenario as TOML text in one key; Flower reads
    the run-config file and refuses keys that pyproject's [tool.flwr.app.config] lacks."""
    import tomllib

    import tomli_w
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    scenario = load_scenario(name)
    config = run_config(scenario, tmp_path / "runs", resume=tmp_path / "runs" / "x")
    assert set(config) == {"scenario", "resume"} and all(isinstance(v, str) for v in config.values())
    (tmp_path / "run.toml").write_text(tomli_w.dumps(config))
    declared = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    fused = fuse_dicts(declared, parse_config_args([str(tmp_path / "run.toml")]), check_keys=True)
    back, resume = scenario_from_run_config(fused)
    assert resume == str((tmp_path / "runs" / "x").resolve())
    assert back["run"].pop("out") == str((tmp_path / "runs").resolve())
    scenario["run"].pop("out")
    assert back["data"].pop("deployed") is True  # the server scores against data.truth only
    scenario["data"].pop("deployed")
    assert back == scenario
    # `flwr run . -c 'scenario="tiny"'` (the README's line) names a built-in scenario
    tiny = fuse_dicts(declared, parse_config_args(['scenario="tiny"']), check_keys=True)
    assert scenario_from_run_config(tiny) == (load_scenario("tiny"), None)


@pytest.mark.parametrize("config, field, message", [
    ({"scenario": "[run]\nrounds = "}, "scenario", "not valid TOML"),
    ({"scenario": "tinyy"}, "scenario", "'tinyy' is not a built-in scenario"),
    ({"scenario": "[run]\nrounds = 0\n[federation]\nclients = 3"}, "run.rounds", "must be > 0"),
    ({"scenario": "tiny", "run.rounds": 5}, "run.rounds", "unknown run-config key"),
    ({"scenario": "tiny", "resume": 3}, "resume", "expected a run directory"),
])
def test_a_bad_run_config_names_the_run_config_and_the_field(config, field, message):
    with pytest.raises(ScenarioError, match="invalid scenario run config") as err:
        scenario_from_run_config(config)
    assert any(name == field and message in text for name, text in err.value.problems), err.value.problems


# ---- the monitor ---------------------------------------------------------------------

def _round(log: monitor.EventLog, arm: str, r: int) -> None:
    log.emit("round_finished", arm=arm, round=r, metrics={"mse": 1.0 / (r + 1)}, cluster_sizes=[2, 1])


def test_events_are_stored_length_delimited_and_read_back_in_order(tmp_path):
    log = monitor.EventLog(tmp_path / "events.pb")
    log.emit("run_started", run_name="x", arms=["a"], rounds=3)
    for r in range(3):
        _round(log, "a", r)
    log.emit("client_failure", arm="a", round=2, node="17", reason="no reply")
    log.emit("run_finished", status="finished")
    stored = monitor.read_events(tmp_path)
    assert stored == log.events and [e.seq for e in stored] == list(range(6))
    assert [e.WhichOneof("kind") for e in stored] == [
        "run_started", "round_finished", "round_finished", "round_finished", "client_failure", "run_finished"]
    assert stored[2].round_finished.metrics["mse"] == 0.5

    # A torn last record (killed mid-write) is dropped; a resumed log continues the numbering.
    data = (tmp_path / "events.pb").read_bytes()
    (tmp_path / "events.pb").write_bytes(data[:-3])
    assert len(monitor.read_events(tmp_path)) == 5
    resumed = monitor.EventLog(tmp_path / "events.pb")
    assert resumed.emit("run_started", run_name="x").seq == 5
    assert [e.seq for e in monitor.read_events(tmp_path)] == list(range(6))
    with pytest.raises(ValueError, match="unknown event kind"):
        resumed.emit("round_started")


def test_watch_streams_every_event_live_and_ends_with_the_run(tmp_path):
    log = monitor.EventLog(tmp_path / "events.pb")
    log.emit("run_started", run_name="live", arms=["a"], rounds=20)
    server, address = monitor.serve(log, "127.0.0.1:0")
    received = []

    def follow() -> None:
        received.extend(monitor.watch(address, timeout=30))

    try:
        watcher = threading.Thread(target=follow)
        watcher.start()
        for r in range(20):  # emitted while the watcher streams
            _round(log, "a", r)
            time.sleep(0.01)
        log.emit("run_finished", status="finished")
        watcher.join(timeout=30)
        assert not watcher.is_alive()
        late = list(monitor.watch(address, from_seq=15, timeout=10))  # replay of a finished run
    finally:
        server.stop(grace=None)
    assert received == monitor.read_events(tmp_path) and len(received) == 22
    assert [e.seq for e in late] == list(range(15, 22))


def test_a_monitor_address_that_cannot_serve_is_named(tmp_path):
    log = monitor.EventLog(tmp_path / "events.pb")
    with pytest.raises(ValueError, match="monitor.address 'nowhere'"):
        monitor.serve(log, "nowhere")


def test_generated_monitor_modules_are_fresh(tmp_path):
    """The committed *_pb2 modules are what grpcio-tools makes of monitor.proto now."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", "proto/umbel/v1/monitor.proto"], cwd=tmp_path, check=True)
    for name in ("monitor_pb2.py", "monitor_pb2_grpc.py"):
        fresh = (tmp_path / "proto/umbel/v1" / name).read_text()
        assert fresh == (ROOT / "proto/umbel/v1" / name).read_text(), (
            f"proto/umbel/v1/{name} is stale: regenerate with `make proto`")


def test_checkpoints_carry_every_strategy_through_pickle():
    """The server's checkpoint pickles the strategy object: each one must survive it."""
    from server.app import flatten, upload_trainer
    from strategies import STRATEGIES, build_strategy

    scenario = load_scenario("tiny", ["anchors.count=4"])
    workload = workload_class("mixed_regression")(scenario)
    base = workload.initial_parameters()
    backdoor = load_scenario("backdoor-doorping")
    uploads = upload_trainer(workload_class("backdoor_distillation")(backdoor))  # data-union trains with it
    for name in STRATEGIES:
        strategy = build_strategy(
            name, 3, proximal_mu=1.0, k=2, dim=5, seed=0, clustered=scenario["clustered"],
            timeout=10.0, start=flatten(base), lr=0.1, robust=scenario["robust"], uploads=uploads)
        clone = pickle.loads(pickle.dumps(strategy))
        assert type(clone) is type(strategy)
