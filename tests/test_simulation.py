"""Integration through Flower's real simulation engine on Ray (no mocks of Flower)."""

import json

import numpy as np
import pytest

from server.record import load_history
from simulations.launcher import simulate
from simulations.scenarios import load_scenario
from workloads.mixed_regression import MixedRegression

pytestmark = pytest.mark.slow


PLACEMENT = ("wall_time_s", "cohort_nodes", "cohorts_generated", "reply_bytes")  # where and how fast, not what


def _strip_times(history):
    for rows in history["strategies"].values():
        for row in rows:
            for key in PLACEMENT:
                row.pop(key, None)
    return history


def test_cohorts_of_50(ray_cluster, tmp_path):
    scenario = load_scenario(
        "tiny",
        ["federation.clients=500", "federation.cohort_size=50", "run.rounds=4",
         "mixed_regression.clusters=1", "federation.size_law='zipf'", "federation.max_size=50"],
    )
    run_dir = simulate(scenario, out=tmp_path, ray_address=ray_cluster)
    history = load_history(run_dir)
    assert history["status"] == "finished"
    for name in ("fedavg", "fedprox"):
        rows = history["strategies"][name]
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
        assert all(r["clients"] == 500 and r["dropped"] == 0 for r in rows[1:])
        # one cluster: a single model can fit it, so both strategies converge toward the truth
        errors = [r["estimation_error"] for r in rows]
        assert errors[-1] < 0.25 * errors[0]
        assert rows[-1]["mse"] < rows[0]["mse"]
    for f in ("scenario.toml", "history.json", "summary.md", "estimation_error.png", "mse.png"):
        assert (run_dir / f).is_file()


def test_ten_nodes_one_client_each_matches_the_numpy_reference(ray_cluster, tmp_path):
    """cohort_size = 1: each client is its own Flower node (the device case). The run must
    reproduce a plain numpy FedAvg loop over the same clients."""
    scenario = load_scenario(
        "tiny",
        ["federation.clients=10", "federation.cohort_size=1", "run.rounds=3",
         "run.strategies=['fedavg']"],
    )
    run_dir = simulate(scenario, out=tmp_path, ray_address=ray_cluster)
    rows = load_history(run_dir)["strategies"]["fedavg"]
    assert all(r["clients"] == 10 for r in rows[1:])

    from workloads.base import TrainSettings, stack_params
    from server.run_config import client_view

    wl = MixedRegression(client_view(scenario))
    data = wl.client_data(np.arange(10))
    w = np.zeros(wl.dim)
    settings = TrainSettings(local_steps=scenario["train"]["local_steps"], lr=scenario["train"]["lr"])
    for r in range(1, 4):
        trained = wl.local_train(stack_params({"w": w}, 10), data, settings)["w"]
        w = data.num_examples @ trained / data.num_examples.sum()
        expected = wl.central_metrics({"w": w})["estimation_error"]
        assert abs(rows[r]["estimation_error"] - expected) < 1e-12


def test_history_identical_across_cohort_sizes_workers_and_ray_nodes(ray_cluster, tmp_path):
    """Cohorts of 1, 7 or 40 clients on the two-node cluster, and on a private one-node Ray
    with one actor of two CPUs: the same record."""
    histories = []
    for cohort, address, cpus in ((1, ray_cluster, 1), (7, ray_cluster, 1), (40, ray_cluster, 1),
                                  (7, None, 2)):
        scenario = load_scenario(
            "tiny",
            ["federation.clients=40", f"federation.cohort_size={cohort}", "run.rounds=3"],
        )
        run_dir = simulate(scenario, out=tmp_path / f"c{cohort}-{cpus}",
                           ray_address=address, client_cpus=cpus)
        histories.append(json.dumps(_strip_times(load_history(run_dir)), sort_keys=True))
    assert all(h == histories[0] for h in histories[1:])


def test_clustered_strategies_through_flower_match_the_reference(ray_cluster, tmp_path):
    """Phase 1 and Phase 2 over real Flower messages reproduce the in-process reference;
    replies as per-client results or as per-cluster partial sums give the same record."""
    from simulations.reference import Reference

    overrides = ["federation.clients=300", "federation.cohort_size=60", "run.rounds=5",
                 "run.strategies=['clustered-fedavg', 'clustered-fedprox', 'ifca', 'oracle']"]
    histories = {}
    for reply in ("clients", "sums"):
        scenario = load_scenario("default", overrides + [f"clustered.reply='{reply}'"])
        run_dir = simulate(scenario, out=tmp_path / reply, ray_address=ray_cluster)
        histories[reply] = _strip_times(load_history(run_dir))
    assert json.dumps(histories["clients"], sort_keys=True) == json.dumps(histories["sums"], sort_keys=True)
    ref = Reference(load_scenario("default", overrides))
    for name in ("clustered-fedavg", "clustered-fedprox", "ifca", "oracle"):
        flower_rows = histories["clients"]["strategies"][name]
        ref_rows = ref.run(name)
        for f, r in zip(flower_rows, ref_rows, strict=True):
            assert abs(f["estimation_error"] - r["estimation_error"]) < 1e-12
            assert f["misclustering_rate"] == r["misclustering_rate"]
            assert abs(f["mse"] - r["mse"]) < 1e-12
    row0 = histories["clients"]["strategies"]["clustered-fedavg"][0]
    assert row0["estimation_error"] < row0["handed_in_estimation_error"]  # Phase 1 replaced them


def test_issue_17s_refinements_through_flower_are_bit_identical_across_cohorts_and_reply_forms(ray_cluster, tmp_path):
    """Second-order refinement (hard and soft assignments), the server step with momentum,
    IFCA's official update from Bernoulli starts and seeded random anchors, through Flower's
    engine: cohorts of 60 replying per client and cohorts of 7 replying per-cluster sums
    (soft assignments: per client, always) record the same history, and it is the in-process
    engine's."""
    from simulations.reference import Reference

    arms = ["clustered-second-order", "soft", "momentum", "ifca-official"]
    overrides = ["federation.clients=300", "run.rounds=4", "anchors.choice='random'", f"run.strategies={arms}",
                 "strategy.soft.use='clustered-fedavg'", "strategy.soft.refine='second-order'",
                 "strategy.soft.assignment='soft'", "strategy.soft.reply='clients'",
                 "strategy.momentum.use='clustered-fedavg'", "strategy.momentum.server_momentum=0.5",
                 "strategy.momentum.lr=0.2", "strategy.ifca-official.use='ifca'",
                 "strategy.ifca-official.update='official'", "strategy.ifca-official.init='bernoulli'",
                 "strategy.ifca-official.lr=1.0"]
    histories = []
    for cohort, reply in ((60, "clients"), (7, "sums")):
        scenario = load_scenario("default", overrides + [f"federation.cohort_size={cohort}", f"clustered.reply='{reply}'",
                                                         f"strategy.clustered-second-order.reply='{reply}'"])
        run_dir = simulate(scenario, out=tmp_path / reply, ray_address=ray_cluster)
        histories.append(_strip_times(load_history(run_dir)))
    assert json.dumps(histories[0], sort_keys=True) == json.dumps(histories[1], sort_keys=True)
    ref = Reference(load_scenario("default", overrides + ["federation.cohort_size=60"]))
    for arm in arms:
        flower_rows = histories[0]["strategies"][arm]
        for f, r in zip(flower_rows, ref.run(arm, keep_models=False), strict=True):
            assert f["estimation_error"] == r["estimation_error"] and f["mse"] == r["mse"], (arm, f["round"])
