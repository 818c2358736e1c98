"""Every workload with client data on devices without cluster labels: `umbel data export`,
a SuperLink with TLS and device authentication and a device per client file, `umbel deploy
run` through the CLI; the record matches the in-process simulation. Real Flower processes."""

from __future__ import annotations

import numpy as np
import pytest

from deployment_support import deploy_with_the_cli, matches_the_simulation, no_labels_no_drops
from server.record import load_history
from simulations.launcher import arm_labels
from simulations.scenarios import load_scenario

pytestmark = pytest.mark.slow


def test_umbel_deploy_run_carries_active_learning_to_devices(tmp_path):
    """Two devices, one selection rule (arms are the deploy-tiny tests' concern), a label
    query in round 2 that each device answers from its own unlabelled pool."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "active_learning.rules=['entropy']", "active_learning.rounds_per_cycle=1",
                 "active_learning.initial_labels=8", "active_learning.budget=4",
                 "active_learning.centralised=false", "train.local_steps=5"]
    run_dir = deploy_with_the_cli(tmp_path, "active-learning", overrides, ["al-0", "al-1"])
    history = load_history(run_dir)
    assert history["status"] == "finished"
    assert sorted(history["strategies"]) == sorted(arm_labels(load_scenario("active-learning", overrides)))
    for arm, rows in history["strategies"].items():
        assert [r["round"] for r in rows] == [0, 1, 2], arm
        assert all(np.isfinite(r["accuracy"]) and 0 <= r["accuracy"] <= 1 for r in rows), arm
        assert rows[2]["queried"] == 4, arm  # the round-2 query: the federation's budget
        no_labels_no_drops(rows, clients=2)


def test_umbel_deploy_run_carries_koopman_to_devices_without_viscosity_groups(tmp_path):
    """Two devices of two viscosity groups on two grids; a round of IFCA's two models, no labels."""
    overrides = ["federation.clients=2", "koopman.viscosities=[0.01, 0.05]", "koopman.grids=[32, 64]",
                 "koopman.train_per_client=2", "koopman.test_per_viscosity=2", "koopman.eval_grid=32",
                 "koopman.solver_points=64", "koopman.modes=4", "koopman.width=8", "koopman.power=2",
                 "koopman.batch_size=2", "koopman.rollout_horizons=1", "koopman.baselines=[]",
                 "anchors.count=2", "run.strategies=['ifca']", "run.rounds=1", "run.round_timeout=120.0",
                 "train.local_steps=2"]
    run_dir = deploy_with_the_cli(tmp_path, "koopman-burgers", overrides, ["kp-0", "kp-1"])
    history = load_history(run_dir)
    assert history["status"] == "finished"
    assert list(history["strategies"]) == ["ifca"]
    rows = history["strategies"]["ifca"]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["rel_l2"]) for r in rows)
    no_labels_no_drops(rows, clients=2)


def test_umbel_deploy_run_carries_ccgc_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices, each smoothing its own subgraph from its file (no node classes); FedAvg
    through a warm-up round and a cluster-guided one ends with the in-process simulation's
    encoders and centres, and the server's evaluator scores every round alike."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "ccgc.nodes=200", "ccgc.degree=20", "ccgc.feature_dim=16", "ccgc.dims=16",
                 "ccgc.init_sample=100", "ccgc.warmup_rounds=1", "ccgc.baselines=[]", "train.local_steps=3"]
    run_dir = deploy_with_the_cli(tmp_path, "ccgc-clustering", overrides, ["cg-0", "cg-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "edges", "features", "node_ids"]
               for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    assert list(history["strategies"]) == ["fedavg"]
    rows = history["strategies"]["fedavg"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    no_labels_no_drops(rows, clients=2)
    matches_the_simulation(run_dir, load_scenario("ccgc-clustering", overrides), "fedavg", rows,
                           ("nmi", "acc", "node_ari", "f1", "refit_nmi", "cluster_loss"))


def test_umbel_deploy_run_carries_snf_pruning_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices through SNF's search and pruned phases (dense FedAvg is any FedAvg): round 1
    the search (each device scores the candidates on its own validation digits), round 2
    pruned to the best-scored widths with masks every device shares; the models and the
    evaluator's scores are the in-process simulation's."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=2", "run.round_timeout=120.0",
                 "snf.methods=['searched']", "snf.cuts=[0.5]", "snf.widths=[4, 8, 8]", "snf.test_size=200",
                 "snf.test_views=1", "snf.candidates=2", "snf.proxy_steps=1", "snf.dense_rounds=0",
                 "train.local_steps=2"]
    run_dir = deploy_with_the_cli(tmp_path, "snf-pruning", overrides, ["snf-0", "snf-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "images", "targets", "validation"]
               for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    rows = history["strategies"]["fedavg/searched@0.5"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    no_labels_no_drops(rows, clients=2)
    assert rows[1]["flops_cut"] == 0.0 and rows[2]["flops_cut"] >= 0.5  # pruned after the search round
    deployed = matches_the_simulation(run_dir, load_scenario("snf-pruning", overrides), "fedavg", rows,
                                      ("accuracy", "mflops", "width_1"), variant="searched@0.5", atol=1e-6)
    assert deployed["snf.scores"].max() > 0  # the devices' scores reached the server


def test_umbel_deploy_run_carries_mgtab_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices, each training RGCN on its own community (its users' labels and the
    relations among them, read from its file); FedAvg ends with the in-process simulation's
    models, and the server's evaluator scores every round alike."""
    overrides = ["federation.clients=2", "federation.cohort_size=1", "run.rounds=1", "run.round_timeout=120.0",
                 "run.strategies=['fedavg']", "mgtab.nodes=200", "mgtab.communities=2", "mgtab.text_dim=8",
                 "mgtab.hidden=8", "anchors.count=1", "mgtab.baselines=[]", "train.local_steps=3"]
    run_dir = deploy_with_the_cli(tmp_path, "mgtab-bots", overrides, ["mg-0", "mg-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "edge_type", "edges", "features", "node_ids", "split",
                                            "y_bot", "y_stance"] for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    rows = history["strategies"]["fedavg"]
    assert [r["round"] for r in rows] == [0, 1]
    no_labels_no_drops(rows, clients=2)
    deployed = matches_the_simulation(run_dir, load_scenario("mgtab-bots", overrides), "fedavg", rows,
                                      ("f1_bot", "acc_bot", "f1_stance", "acc_stance", "round_f1_bot", "val_score",
                                       "train_loss"))
    assert deployed["age"].ravel().tolist() == [1.0]
