"""Your own data in a simulation (``data.folder``): one device file per client, an optional
truth file (``data.truth``) that alone enables the truth-based metrics, in simulation and in
a deployment alike; the same folder deployed to devices trains the same models."""

from __future__ import annotations

import numpy as np
import pytest

from deployment import deploy
from server.record import load_history, load_models
from server.run_config import ScenarioError
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from workloads.device_files import TRUTH_FILE, DeviceDataError, folder_index

TRUTH_METRICS = ("estimation_error", "nearest_error", "oracle_error", "misclustering_rate", "ari")
ARMS = ["clustered-second-order", "clustered-soft", "clustered-fedavg", "clustered-fedprox", "ifca"]
BASE = ["federation.clients=300", "federation.cohort_size=60", "run.rounds=5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The default federation's 300 clients as a folder, with ``truth.npz`` (`umbel data
    export --truth`)."""
    folder = tmp_path_factory.mktemp("folder")
    deploy.export_device_data(load_scenario("default", BASE), folder, truth=True)
    return folder


def run_all(scenario: dict, arms: list[str]) -> dict[str, list[dict]]:
    ref = Reference(scenario)
    return {arm: ref.run(arm) for arm in arms}


def same_rows(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in keys:
            assert x.get(key) == y.get(key), (x["round"], key)


def test_a_folder_with_its_truth_file_is_the_generated_federation_bit_for_bit(exported):
    generated = run_all(load_scenario("default", [*BASE, f"run.strategies={ARMS + ['oracle']}"]), ARMS + ["oracle"])
    folder = run_all(load_scenario("default", [*BASE, f"run.strategies={ARMS + ['oracle']}", f"data.folder='{exported}'",
                                               f"data.truth='{TRUTH_FILE}'"]), ARMS + ["oracle"])
    for arm in ARMS + ["oracle"]:
        same_rows(generated[arm], folder[arm], (*TRUTH_METRICS, "mse", "clients", "cluster_clients"))
        assert np.array_equal(generated[arm][-1]["models"]["w"], folder[arm][-1]["models"]["w"]), arm
        assert folder[arm][-1]["estimation_error"] is not None


def test_a_folder_without_truth_runs_every_clustered_arm_and_records_no_truth_metric(exported):
    with_truth = run_all(load_scenario("default", [*BASE, f"run.strategies={ARMS}", f"data.folder='{exported}'",
                                                   f"data.truth='{TRUTH_FILE}'"]), ARMS)
    scenario = load_scenario("default", [*BASE, f"run.strategies={ARMS}", f"data.folder='{exported}'"])
    without = run_all(scenario, ARMS)
    assert Reference(scenario).workload.key_metric == "mse"
    for arm in ARMS:
        rows = without[arm]
        assert not [key for row in rows for key in row if key in TRUTH_METRICS or key.startswith("misclustering")]
        assert all(row["mse"] is not None for row in rows[1:])
        # the truth only scores: the models are those of the run with it
        assert np.array_equal(rows[-1]["models"]["w"], with_truth[arm][-1]["models"]["w"]), arm


def test_folder_settings_and_files_that_cannot_run_are_named(exported, tmp_path):
    folder = f"data.folder='{exported}'"
    for overrides, field in (
        (["data.folder='/nonexistent/umbel'"], "data.folder: '/nonexistent/umbel' is not a folder"),
        ([folder, "federation.clients=299"], "federation.clients: 299 clients but"),
        ([folder, "run.strategies=['oracle']"], "run.strategies: 'oracle' uses the true clusters"),
        ([folder, "clustered.init='truth'"], "clustered.init: 'truth' needs the true models"),
        (["data.truth='truth.npz'"], "data.truth: a truth file belongs to a data.folder or a deployment"),
        ([folder, "data.truth='missing.npz'"], "data.truth: .*missing.npz' is not a file"),
    ):
        with pytest.raises(ScenarioError, match=field):
            load_scenario("default", [*BASE, *overrides])
    (tmp_path / "gap").mkdir()
    for i in (0, 1, 1):
        np.savez(tmp_path / "gap" / f"c{i}-{len(list((tmp_path / 'gap').iterdir()))}.npz",
                 client_id=np.int64(i), x=np.zeros((1, 20)), y=np.zeros(1))
    with pytest.raises(DeviceDataError, match="client_id 1 is also in"):
        folder_index(tmp_path / "gap", 3)


@pytest.mark.slow
def test_the_same_folder_deployed_to_devices_trains_the_same_models_and_scores_no_truth(tmp_path):
    """deploy-tiny's three clients as a folder without labels or truth: simulated from the
    folder, then deployed (a device per file, TLS, authentication): both arms end at the
    simulation's models (soft assignments too, from the devices' own y'y), and the deployment
    records no truth-based metric (its server does
    not score against the generator's models)."""
    from deployment_support import Deployment, no_labels_no_drops

    folder = tmp_path / "data"
    deploy.export_device_data(load_scenario("deploy-tiny"), folder)
    arms = ["clustered-fedavg", "second-order", "soft"]
    scenario = load_scenario("deploy-tiny", [
        f"run.strategies={arms}", "strategy.second-order.use='clustered-fedavg'",
        "strategy.second-order.refine='second-order'", "strategy.soft.use='clustered-fedavg'",
        "strategy.soft.refine='second-order'", "strategy.soft.assignment='soft'", "strategy.soft.reply='clients'",
        f"data.folder='{folder}'"])
    simulated = run_all(scenario, arms)
    d = Deployment(tmp_path, scenario, spare=(), data=folder)
    try:
        status, run_dir = d.run(scenario)
    finally:
        deploy.stop_all(d.home, timeout=1)
    assert status["status"] == "finished:completed", status
    history = load_history(run_dir)
    assert history["key_metric"] == "mse"
    for arm in arms:
        rows = history["strategies"][arm]
        no_labels_no_drops(rows, clients=3)
        assert not [key for row in rows for key in row if key in TRUTH_METRICS]
        np.testing.assert_allclose(load_models(run_dir, arm)["w"], simulated[arm][-1]["models"]["w"], rtol=0, atol=1e-9)
