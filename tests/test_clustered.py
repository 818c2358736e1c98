"""The clustered mixed-regression strategy (Su, Xu, Yang 2022), IFCA and the oracle.

Statistical claims run on the spec's instance (d=20, k=4, 1000 clients, capped Zipf(1.6)
sizes, sigma=0.1, separation 0.8, 8 anchors of 65 points) through the in-process reference,
which shares every line of arithmetic with the Flower path (``tests/test_simulation.py``
checks that the two agree). Margins were calibrated on a pilot over seeds 0-4 (see README).
"""

import numpy as np
import pytest

from server.app import initial_models
from server.run_config import ScenarioError
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from client.compute import assign_clusters
from proto.exact_sum import dd_add, dd_sum, dd_value
from proto.wire import cluster_sums
from proto.wire import combine_sums as combine
from strategies.clustered import cluster_means, kmeans
from strategies.coarse_init import coverage_warnings

SEEDS = range(5)
BAR = 1.25  # final estimation_error <= BAR x the label oracle's (the line)


def reference(*overrides, seed=0):
    return Reference(load_scenario("default", list(overrides), seed=seed))


def ratio(ref, rows):
    return rows[-1]["estimation_error"] / ref.workload.oracle()["error"]


# ---- the pure core -----------------------------------------------------------------------


def test_ties_go_to_the_lowest_index_and_empty_clusters_keep_their_model():
    assert list(assign_clusters(np.array([[1.0, 1.0, 2.0], [3.0, 0.5, 0.5]]))) == [0, 1]
    sums = cluster_sums(np.array([0, 0, 2]), np.array([1, 3, 2]),
                        {"w": np.array([[1.0], [5.0], [7.0]])}, np.zeros(3), k=3)
    new = cluster_means(sums, {"w": np.array([[9.0], [8.0], [6.0]])})
    assert np.allclose(new["w"][:, 0], [4.0, 8.0, 7.0])  # cluster 1 was empty: kept 8


def test_double_double_sums_do_not_depend_on_grouping():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_001) * 10.0 ** rng.integers(-8, 8, 10_001)
    whole = dd_value(dd_sum(x))
    for cut in (1, 7, 5000, 9999):
        assert dd_value(dd_add(dd_sum(x[:cut]), dd_sum(x[cut:]))) == whole
    assert dd_value(dd_sum(rng.permutation(x))) == whole


def test_partial_sums_equal_per_client_aggregation():
    rng = np.random.default_rng(1)
    choice, n = rng.integers(0, 3, 500), rng.integers(1, 50, 500)
    w, loss = {"w": rng.standard_normal((500, 4))}, rng.random(500)
    whole = cluster_sums(choice, n, w, loss, 3)
    parts = [cluster_sums(choice[s], n[s], {"w": w["w"][s]}, loss[s], 3)
             for s in (slice(0, 123), slice(123, 124), slice(124, 500))]
    prev = {"w": np.zeros((3, 4))}
    assert np.array_equal(cluster_means(combine(parts), prev)["w"], cluster_means(whole, prev)["w"])


def test_kmeans_is_deterministic_and_finds_separated_groups():
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0], [5, 0], [0, 5]])
    pts = np.concatenate([c + 0.1 * rng.standard_normal((4, 2)) for c in centres])
    found = kmeans(pts, 3, restarts=10, seed=3)
    assert np.array_equal(found, kmeans(pts, 3, restarts=10, seed=3))
    nearest = np.linalg.norm(centres[:, None] - found[None], axis=2).min(axis=1)
    assert nearest.max() < 0.2


def test_coverage_warning_when_anchors_miss_a_cluster():
    pts = np.array([[0.0, 0], [0.01, 0], [5, 0], [5.01, 0], [0, 5], [0.01, 5]])
    assert coverage_warnings(pts, kmeans(pts, 3, 5, 0)) == []
    warnings = coverage_warnings(pts, kmeans(pts, 4, 5, 0))  # 4 clusters, anchors cover 3
    assert warnings and "raise anchors.count" in warnings[0]
    assert "clear of noise" not in warnings[0]  # no moment spectrum given: no claim about one


# ---- Phase 1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("routine", ["subspace-kmeans", "moment-descent"])
def test_phase1_lands_within_a_quarter_of_the_separation(routine):
    worst = 0.0
    for seed in range(20):
        ref = reference(seed=seed)
        coarse = ref.phase1(routine)
        err = ref.workload.central_metrics({"w": coarse.centres})["estimation_error"]
        worst = max(worst, err)
    assert worst <= 0.8 / 4, worst


def test_phase1_errors_name_what_to_change():
    with pytest.raises(ScenarioError, match="anchors.count: 3 anchors cannot cover 4 clusters"):
        load_scenario("default", ["anchors.count=3"])
    with pytest.raises(ScenarioError, match="anchors.size: 3 points per anchor"):
        load_scenario("default", ["anchors.size=3"])
    with pytest.raises(ScenarioError, match="mixed_regression.clusters: 6 clusters exceed dim 5"):
        load_scenario("default", ["mixed_regression.dim=5", "mixed_regression.clusters=6"])
    # baselines need no anchors
    load_scenario("default", ["anchors.count=0", "run.strategies=['ifca', 'oracle']"])


# ---- Phase 2: against the oracle, from any start --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["clustered-fedavg", "clustered-fedprox"])
def test_final_error_within_the_bar_of_the_label_oracle(strategy):
    ratios = [ratio(ref, ref.run(strategy)) for ref in (reference(seed=s) for s in SEEDS)]
    assert max(ratios) <= BAR, ratios


@pytest.mark.slow
def test_result_does_not_depend_on_the_initial_models():
    ref = reference()
    wl = ref.workload
    starts = [initial_models(wl, "zeros", 0), initial_models(wl, "true-first", 0)]
    rng = np.random.default_rng(7)
    starts += [{"w": rng.standard_normal((4, 20)) * scale} for scale in np.geomspace(0.01, 100, 6)]
    finals = [ref.run("clustered-fedavg", start=s)[-1] for s in starts]
    for final in finals:  # Phase 1 replaces whatever was handed in: the very same run
        assert np.array_equal(final["models"]["w"], finals[0]["models"]["w"])
    assert finals[0]["estimation_error"] <= BAR * wl.oracle()["error"]
    # IFCA has no Phase 1: where it ends depends on what it is handed (at lr 0.4 both of
    # these reach the bar, README benchmark; from random starts 3 of 30 do not)
    ifca = [ref.run("ifca", start=s)[-1]["models"]["w"] for s in (starts[1], wl.true_parameters())]
    assert not np.array_equal(ifca[0], ifca[1])
    assert ratio(ref, ref.run("ifca", start=wl.true_parameters())) <= BAR  # the truth-start reference


@pytest.mark.slow
def test_one_point_clients_misclustered_near_the_bayes_rate():
    for seed in SEEDS:
        ref = reference(seed=seed)
        bayes = ref.workload.oracle()["bayes_misclustering"]["n1"]
        final = ref.run("clustered-fedavg")[-1]
        assert 0.05 < bayes < 0.3  # the instance has a real small-client problem
        assert abs(final["misclustering_n1"] - bayes) <= 0.03, (seed, final["misclustering_n1"], bayes)
        assert final["misclustering_n11plus"] == 0.0


def run_summary(strategy: str, seed: int, *overrides: str) -> dict:
    """One run's final ratio to the oracle, the clients per round and the share of one-point
    clients (module level: the seeds of a test run on both cores)."""
    ref = reference(*overrides, seed=seed)
    rows = ref.run(strategy)
    sizes = np.concatenate([c.num_examples for c in ref.cohorts])
    return {"ratio": ratio(ref, rows), "clients": [r["clients"] for r in rows[1:]],
            "one_point_share": float(np.mean(sizes == 1))}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["clustered-fedavg", "clustered-fedprox"])
def test_thirty_percent_dropout_each_round(strategy):
    from conftest import on_both_cores

    # a constant step of 0.4 on each round's 70% keeps a noise floor (1.31x on seed 0; second
    # order, refitting each round's sample, 1.47x): a cosine decay averages it out (README)
    runs = on_both_cores([(run_summary, strategy, seed, "federation.dropout=0.3", "train.lr_schedule='cosine'")
                          for seed in SEEDS])
    for seed, run in zip(SEEDS, runs):
        assert run["ratio"] <= BAR, (seed, run["ratio"])
        assert all(600 < c < 800 for c in run["clients"])  # about 30% dropped each round


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["clustered-fedavg", "clustered-fedprox"])
def test_ninety_percent_single_point_clients(strategy):
    """Nine clients in ten hold one point; Phase 1 lands farther off (0.25-0.44), and Phase 2
    still reaches its fixed point within the bar."""
    from conftest import on_both_cores

    # FedProx at mu = 40: the default scenario's mu = 10 is faster but its local solve
    # overweights one-point clients (up to 1.27x here)
    runs = on_both_cores([(run_summary, strategy, seed, "federation.single_point_fraction=0.9", "run.rounds=400",
                           "train.proximal_mu=40.0") for seed in SEEDS])
    assert all(run["one_point_share"] > 0.88 for run in runs)
    ratios = [run["ratio"] for run in runs]
    assert max(ratios) <= BAR, ratios


def test_partial_participation_trains_a_sampled_fraction():
    ref = reference("federation.participation=0.5", "run.rounds=3")
    from client.compute import train_cohort
    from workloads.base import TrainSettings

    models = {"w": ref.workload.true_models}
    counts = [sum(len(r.batch) for r in [train_cohort(ref.workload, c, models, selection="min-loss",
              reply="clients", settings=TrainSettings(local_steps=1, lr=0.05), round_=rnd,
              federation=ref.scenario["federation"]) for c in ref.cohorts]) for rnd in (1, 2)]
    assert all(430 < c < 570 for c in counts) and counts[0] != counts[1]


def test_sums_and_per_client_replies_give_identical_models():
    a = reference("run.rounds=8").run("clustered-fedprox", reply="clients")
    b = reference("run.rounds=8").run("clustered-fedprox", reply="sums")
    c = reference("run.rounds=8", "federation.cohort_size=7").run("clustered-fedprox", reply="sums")
    assert np.array_equal(a[-1]["models"]["w"], b[-1]["models"]["w"])
    assert np.array_equal(a[-1]["models"]["w"], c[-1]["models"]["w"])
    for x, y, z in zip(a, b, c, strict=True):  # every round's models, through their metrics
        assert x["estimation_error"] == y["estimation_error"] == z["estimation_error"]
        assert x["misclustering_rate"] == y["misclustering_rate"] == z["misclustering_rate"]


def test_rounds_without_replies_keep_phase_1s_models():
    """With nearly every client dropping out, rounds aggregate nothing: the models Phase 1
    sent go on (before the round engine, round 1 fell back to the random start: error 0.96)."""
    rows = Reference(load_scenario("deploy-tiny", ["federation.dropout=0.99"])).run("clustered-fedavg")
    assert [r["clients"] for r in rows[1:]] == [0, 0, 0]
    assert all(r["estimation_error"] == rows[0]["estimation_error"] for r in rows)
    assert rows[0]["estimation_error"] < rows[0]["handed_in_estimation_error"]
