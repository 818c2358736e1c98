"""CCGC graph clustering: smoothing, the cluster-guided loss over all clusters, metrics,
federated k-means exact under FedAvg, the generator, the real-format loaders, scenario
checks, and the acceptance claim on fixed seeds (centralised and federated)."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score

from proto.wire import ClientBatch
from server.run_config import ScenarioError, client_view
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from strategies.aggregation import weighted_average
from workloads.base import TrainSettings, stack_params
from workloads.ccgc import CCGCClustering
from workloads.ccgc.data import (
    GraphDataError, client_subgraph, contextual_sbm, edge_homophily, load_npy_graph, load_planetoid, split_nodes,
)
from workloads.ccgc.kmeans import assign, centres_from, client_statistics, cluster_sums
from workloads.ccgc.metrics import clustering_scores
from workloads.ccgc.model import cluster_guided_terms, confident_nodes, embed, smooth_features

torch.set_num_threads(1)


def _workload(*overrides, seed=0):
    scenario = load_scenario("ccgc-clustering", list(overrides), seed=seed)
    return scenario, CCGCClustering(client_view(scenario))


# ---- smoothing and the loss ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_smoothing_equals_the_dense_power_of_the_normalised_adjacency(steps):
    rng = np.random.default_rng(0)
    a = np.triu(rng.random((30, 30)) < 0.15, 1)
    a = (a | a.T).astype(float)
    a[:3] = a[:, :3] = 0  # isolated nodes: their degree in A + I is 1
    x = rng.standard_normal((30, 5))
    d = np.diag(1 / np.sqrt((a + np.eye(30)).sum(1)))
    a_hat = d @ (a + np.eye(30)) @ d
    expected = np.linalg.matrix_power(a_hat, steps) @ x
    assert np.allclose(smooth_features(sp.csr_matrix(a), x, steps), expected, atol=1e-5)


def _clustered_views(clusters=4, per=20, dims=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(clusters, dims, generator=g)
    labels = np.repeat(np.arange(clusters), per)
    z1 = F.normalize(centre[labels] + 0.3 * torch.randn(len(labels), dims, generator=g), dim=1)
    z2 = F.normalize(centre[labels] + 0.3 * torch.randn(len(labels), dims, generator=g), dim=1)
    return z1.requires_grad_(), z2.requires_grad_(), labels


def test_every_cluster_contributes_a_positive_term_and_a_centre():
    """The official loop skips the lowest cluster label; here all K clusters count."""
    z1, z2, labels = _clustered_views()
    confident = np.arange(len(labels))
    terms = cluster_guided_terms(z1, z2, labels, confident, clusters=4, rng=np.random.default_rng(0))
    assert terms.present.all() and len(terms.centres1) == len(terms.centres2) == 4
    assert (terms.positive > 0).all()
    for k in range(4):  # each centre is its own cluster's normalised mean, cluster 0 included
        mean = F.normalize(z1[labels == k].mean(0), dim=0)
        assert torch.allclose(terms.centres1[k], mean, atol=1e-6)
    terms.loss(0.5).backward()
    assert z1.grad[labels == 0].abs().sum() > 0 and z2.grad[labels == 0].abs().sum() > 0


def test_sampling_takes_the_share_per_view_and_the_expectation_matches_it():
    z1, z2, labels = _clustered_views(clusters=3, per=10)
    confident = np.arange(len(labels))
    draws = [cluster_guided_terms(z1, z2, labels, confident, clusters=3, rng=np.random.default_rng(s)).positive
             for s in range(400)]
    expected = cluster_guided_terms(z1, z2, labels, confident, clusters=3, rng=None).positive
    # 8 of 10 nodes per view and cluster: the mean over draws approaches the expectation
    assert torch.allclose(torch.stack(draws).mean(0), expected, rtol=0.03)


def test_a_cluster_absent_here_takes_the_fallback_centre_and_no_positive_term():
    z1, z2, labels = _clustered_views(clusters=3)
    confident = np.flatnonzero(labels != 1)
    fallback = np.eye(3, z1.shape[1])
    terms = cluster_guided_terms(z1, z2, labels, confident, clusters=3, rng=np.random.default_rng(0),
                                 fallback_centres=fallback)
    assert list(terms.present) == [True, False, True] and terms.positive[1] == 0
    assert torch.allclose(terms.centres1[1], torch.tensor(fallback[1], dtype=torch.float32))
    alone = cluster_guided_terms(z1, z2, labels, confident, clusters=3, rng=np.random.default_rng(0))
    assert len(alone.centres1) == 2  # without a fallback the absent cluster is left out


def test_confident_nodes_are_those_below_the_quantile():
    distance = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.5])
    assert list(confident_nodes(distance, 0.5)) == [1, 3, 5]  # below the 4th smallest (3.0)
    assert len(confident_nodes(distance, 1.0)) == 6


# ---- metrics ------------------------------------------------------------------------------


def test_metrics_are_invariant_to_renaming_the_clusters():
    truth = np.repeat(np.arange(4), [5, 7, 9, 11])
    renamed = np.array([2, 0, 3, 1])[truth]
    assert clustering_scores(truth, renamed) == {"acc": 1.0, "nmi": 1.0, "ari": 1.0, "f1": 1.0}


def test_metrics_match_sklearn_and_the_best_permutation():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, 200)
    predicted = np.where(rng.random(200) < 0.6, np.array([3, 1, 0, 2])[truth], rng.integers(0, 4, 200))
    scores = clustering_scores(truth, predicted)
    best = max(itertools.permutations(range(4)), key=lambda p: np.mean(np.array(p)[predicted] == truth))
    relabelled = np.array(best)[predicted]
    assert scores["acc"] == pytest.approx(np.mean(relabelled == truth))
    assert scores["f1"] == pytest.approx(f1_score(truth, relabelled, average="macro"))
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(truth, predicted))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(truth, predicted))


def test_extra_predicted_clusters_count_as_wrong():
    truth = np.array([0, 0, 1, 1])
    assert clustering_scores(truth, np.array([0, 0, 1, 2]))["acc"] == 0.75


# ---- federated k-means --------------------------------------------------------------------


def test_fedavg_of_the_scaled_statistics_gives_the_pooled_cluster_means():
    rng = np.random.default_rng(2)
    clients = [rng.standard_normal((n, 3)) + rng.integers(0, 3, (n, 1)) for n in (7, 40, 13, 100)]
    centres = rng.standard_normal((3, 3))
    stats = [client_statistics(points, centres) for points in clients]
    batch = ClientBatch(np.arange(4), np.array([len(p) for p in clients]),
                        {"sum": np.stack([s for s, _ in stats]), "count": np.stack([c for _, c in stats])}, {})
    averaged = weighted_average(batch)
    pooled = np.concatenate(clients)
    labels, _ = assign(pooled, centres)
    sums, counts = cluster_sums(pooled, labels, 3)
    new = centres_from(averaged["sum"], averaged["count"], centres)
    assert np.allclose(new, sums / counts[:, None], rtol=1e-12, atol=1e-12)
    # only some clients taking part: their pooled means, the same way
    part = ClientBatch(np.array([1, 3]), batch.num_examples[[1, 3]], {k: v[[1, 3]] for k, v in batch.params.items()}, {})
    part_avg = weighted_average(part)
    two = np.concatenate([clients[1], clients[3]])
    s2, c2 = cluster_sums(two, assign(two, centres)[0], 3)
    assert np.allclose(centres_from(part_avg["sum"], part_avg["count"], centres), s2 / c2[:, None])


def test_a_cluster_nobody_joins_keeps_its_previous_centre():
    previous = np.array([[0.0, 0.0], [10.0, 10.0]])
    sums, counts = client_statistics(np.array([[0.0, 1.0], [1.0, 0.0]]), previous)
    assert np.array_equal(centres_from(sums, counts, previous), [[0.5, 0.5], [10.0, 10.0]])


def test_one_round_through_the_engine_moves_the_centres_to_the_pooled_means():
    """End to end (FedAvg over the in-process Flower grid, 3 cohorts): after round 1 the
    model's statistics are one exact Lloyd step on the initial encoders' embeddings."""
    scenario = load_scenario("ccgc-clustering", ["run.rounds=1", "federation.cohort_size=3", "ccgc.nodes=240", "ccgc.degree=10",
                                                 "ccgc.init_sample=100"])
    ref = Reference(scenario)
    start = ref.workload.initial_parameters()
    final = ref.run("fedavg")[-1]["models"]
    data = ref.workload.federation_data
    points = embed(ref.workload._encoders(start), data.smoothed)
    sums, counts = cluster_sums(points, assign(points, start["centre"])[0], len(start["centre"]))
    got = centres_from(final["centre_sum"][0], final["centre_count"][0], start["centre"])
    assert np.allclose(got, sums / counts[:, None], atol=1e-6)
    assert np.allclose(final["centre"][0], start["centre"], atol=1e-6)


# ---- data -----------------------------------------------------------------------------------


def test_the_generator_gives_the_homophily_and_degree_asked_for():
    g = contextual_sbm(nodes=2000, clusters=5, features=16, degree=8.0, homophily=0.7, mu=0.2, seed=3)
    assert g.num_edges == 8000 and g.adjacency.diagonal().sum() == 0
    assert (g.adjacency != g.adjacency.T).nnz == 0
    assert edge_homophily(g) == pytest.approx(0.7, abs=0.02)
    sizes = np.bincount(g.labels)
    assert (np.diff(sizes) > 0).all() and sizes.max() / sizes.min() == pytest.approx(1.5, rel=0.02)
    again = contextual_sbm(nodes=2000, clusters=5, features=16, degree=8.0, homophily=0.7, mu=0.2, seed=3)
    assert np.array_equal(g.features, again.features) and (g.adjacency != again.adjacency).nnz == 0


def test_class_means_have_the_asked_spread():
    g = contextual_sbm(nodes=4000, clusters=4, features=200, degree=2.0, homophily=0.5, mu=0.5, seed=0)
    means = np.stack([g.features[g.labels == k].mean(0) for k in range(4)])
    assert means.std() == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("scheme", ["random", "disjoint-classes"])
def test_partitions_cover_every_node_once_and_keep_only_intra_client_edges(scheme):
    g = contextual_sbm(nodes=300, clusters=4, features=4, degree=6.0, homophily=0.6, mu=0.2, seed=1)
    parts = split_nodes(g.labels, 8, scheme=scheme, classes_per_client=2, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(300))
    kept = 0
    for nodes in parts:
        sub = client_subgraph(g, nodes)
        dense = g.adjacency.toarray()[np.ix_(nodes, nodes)]
        assert np.array_equal(sub.adjacency.toarray(), dense)
        kept += sub.num_edges
        if scheme == "disjoint-classes":
            assert len(np.unique(sub.labels)) <= 2
    assert kept < g.num_edges


def test_disjoint_classes_that_cannot_cover_every_class_are_refused():
    with pytest.raises(ValueError, match="no client holds class"):
        split_nodes(np.repeat(np.arange(4), 5), 1, scheme="disjoint-classes", classes_per_client=2)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_planetoid_files_are_read_with_the_test_rows_put_back(tmp_path):
    """6 nodes: 3 training rows (allx) and 3 test rows given in shuffled test.index order."""
    feats = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    labels = np.array([0, 1, 2, 0, 1, 2])
    onehot = np.eye(3)[labels]
    test_index = [5, 3, 4]  # tx row i is node test_index[i]
    parts = {"x": sp.csr_matrix(feats[:2]), "y": onehot[:2], "allx": sp.csr_matrix(feats[:3]), "ally": onehot[:3],
             "tx": sp.csr_matrix(feats[test_index]), "ty": onehot[test_index],
             "graph": {0: [1], 1: [0, 2], 2: [1], 3: [4, 3], 4: [3], 5: []}}
    for part, obj in parts.items():
        _write_pickle(tmp_path / f"ind.toy.{part}", obj)
    (tmp_path / "ind.toy.test.index").write_text("\n".join(map(str, test_index)) + "\n")
    g = load_planetoid(tmp_path, "toy")
    assert np.array_equal(g.features, feats) and np.array_equal(g.labels, labels)
    edges = {tuple(e) for e in np.argwhere(np.triu(g.adjacency.toarray()))}
    assert edges == {(0, 1), (1, 2), (3, 4)}  # symmetric, the self-loop 3-3 dropped


def test_planetoid_refuses_a_missing_file_and_a_pickle_that_runs_code(tmp_path):
    with pytest.raises(GraphDataError, match=r"ind\.toy\.tx: missing"):
        load_planetoid(tmp_path, "toy")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _write_pickle(tmp_path / "ind.toy.tx", Evil())
    with pytest.raises(GraphDataError, match=r"ind\.toy\.tx: not a readable .*refusing to load builtins\.print"):
        load_planetoid(tmp_path, "toy")


def test_npy_graph_files_are_read_and_a_bad_file_is_named(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    feat = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    adj = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    np.save(folder / "toy_feat.npy", feat)
    np.save(folder / "toy_label.npy", np.array([3, 5, 5, 3]))
    np.save(folder / "toy_adj.npy", adj)
    g = load_npy_graph(tmp_path, "toy")  # finds root/<name>/ as the official layout has it
    assert np.array_equal(g.features, feat) and list(g.labels) == [0, 1, 1, 0]
    assert g.num_edges == 2 and g.adjacency.diagonal().sum() == 0
    np.save(folder / "toy_adj.npy", adj[:3])
    with pytest.raises(GraphDataError, match=r"toy_adj\.npy: expected \(4, 4\)"):
        load_npy_graph(folder, "toy")
    (folder / "toy_label.npy").unlink()
    with pytest.raises(GraphDataError, match=r"toy_label\.npy: missing"):
        load_npy_graph(folder, "toy")


def test_a_scenario_can_read_the_npy_format(tmp_path):
    rng = np.random.default_rng(0)
    g = contextual_sbm(nodes=60, clusters=3, features=5, degree=4.0, homophily=0.8, mu=1.0, seed=0)
    np.save(tmp_path / "toy_feat.npy", g.features)
    np.save(tmp_path / "toy_label.npy", g.labels)
    np.save(tmp_path / "toy_adj.npy", g.adjacency.toarray() * rng.integers(1, 3))
    _, wl = _workload("ccgc.source=npy", f"ccgc.data_dir={tmp_path}", "ccgc.dataset=toy", "federation.clients=3")
    assert wl.num_classes == 3 and wl.federation_data.num_examples.sum() == 60


# ---- the workload and its scenario ---------------------------------------------------------


@pytest.mark.parametrize("override, field, message", [
    ("ccgc.tau=0.0", "ccgc.tau", "must lie in (0, 1]"),
    ("ccgc.homophily=1.5", "ccgc.homophily", "must lie in [0, 1]"),
    ("ccgc.partition=louvain", "ccgc.partition", "is not one of"),
    ("ccgc.method=dec", "ccgc.method", "is not one of"),
    ("ccgc.baselines=['kmeans-raw', 'dmon']", "ccgc.baselines", "unknown baseline 'dmon'"),
    ("ccgc.source=npy", "ccgc.data_dir", "reads files"),
    ("ccgc.source=planetoid", "ccgc.data_dir", "reads files"),
    ("ccgc.clusters=1", "ccgc.clusters", "must be >= 2"),
    ("ccgc.nodes=6", "ccgc.nodes", "cannot hold 4 clusters"),
    ("federation.clients=2000", "federation.clients", "2000 clients for 1200 nodes"),
])
def test_bad_scenarios_name_the_field(override, field, message):
    with pytest.raises(ScenarioError) as err:
        load_scenario("ccgc-clustering", [override])
    assert any(f == field and message in m for f, m in err.value.problems), err.value.problems


def test_uncoverable_disjoint_classes_name_the_field():
    with pytest.raises(ScenarioError) as err:
        load_scenario("ccgc-clustering", ["ccgc.partition=disjoint-classes", "ccgc.classes_per_client=1",
                                          "federation.clients=2"])
    assert err.value.problems[0][0] == "ccgc.classes_per_client"


def test_missing_data_files_are_named_in_the_scenario_error(tmp_path):
    with pytest.raises(ScenarioError) as err:
        load_scenario("ccgc-clustering", ["ccgc.source=planetoid", f"ccgc.data_dir={tmp_path}"])
    field, message = err.value.problems[0]
    assert field == "ccgc.data_dir" and "ind.cora.tx: missing" in message


def test_a_client_sees_the_same_subgraph_in_any_cohort():
    _, wl = _workload()
    whole = wl.client_data(np.arange(8))
    alone = wl.client_data(np.array([5]))
    assert np.array_equal(alone.smoothed, whole.smoothed[whole.rows(5)])
    assert np.array_equal(wl.subset(whole, np.array([5])).node_ids, alone.node_ids)


def test_local_training_is_deterministic_and_sends_the_scaled_statistics():
    _, wl = _workload()
    data = wl.client_data(np.array([0, 3]))
    start = stack_params(wl.initial_parameters(), 2)
    for round_ in (1, 20):  # warm-up, then the cluster-guided loss
        settings = TrainSettings(local_steps=2, lr=1e-3, server_round=round_)
        a, b = wl.local_train(start, data, settings), wl.local_train(start, data, settings)
        assert all(np.array_equal(a[n], b[n]) for n in a)
        assert not np.array_equal(a["view1.weight"], start["view1.weight"])
        assert np.allclose(a["centre_count"].sum(1), 1.0)  # counts / n sum to one per client
        assert np.array_equal(a["centre"], start["centre"])
    assert wl.local_loss(wl.initial_parameters(), data).shape == (2,)


def test_fedprox_pulls_the_encoders_towards_the_start():
    _, wl = _workload()
    data = wl.client_data(np.array([1]))
    start = stack_params(wl.initial_parameters(), 1)

    def moved(mu):
        out = wl.local_train(start, data, TrainSettings(local_steps=20, lr=1e-2, proximal_mu=mu, server_round=1))
        return np.linalg.norm(out["view1.weight"] - start["view1.weight"])

    assert moved(100.0) < moved(0.0)


def test_baselines_are_reference_runs_of_one_round():
    scenario, _ = _workload()
    runs = CCGCClustering.baselines(scenario)
    assert set(runs) == {"kmeans-raw", "kmeans-smoothed", "kmeans-smoothed-full", "spectral", "centralised"}
    assert runs["spectral"] == {"run": {"rounds": 1, "strategies": ["fedavg"]}, "ccgc": {"method": "spectral"}}
    scenario["ccgc"]["method"] = "kmeans-raw"
    assert CCGCClustering.baselines(scenario) == {}


# ---- the claim, on fixed seeds --------------------------------------------------------------

# The spec's claim, on seeds 0-2 (paired: every method sees the same graph per seed), asserted on
# the means; the pilot's per-seed numbers are in the comments. Centralised, at h = 0.7 (the spec's
# table setting; its generator's h = 0.6 sends 40% of edges to any node, 10% of them in-class):
# CCGC 0.837/0.853/0.858 NMI, k-means smoothed 0.849/0.861/0.881, raw 0.255/0.222/0.298.
# Federated (the built-in scenario: 8 random subgraphs, each of mean degree 10): FedAvg CCGC
# 0.645/0.633/0.565, k-means on the clients' smoothed features 0.653/0.666/0.620, raw
# 0.245/0.239/0.323 (seed 2 alone misses both bars: +0.24 and -0.055).


def _nmi(scenario, method):
    return CCGCClustering(client_view({**scenario, "ccgc": {**scenario["ccgc"], "method": method}})).reference_scores["nmi"]


SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_centralised_ccgc_clusters_far_above_raw_kmeans_and_near_smoothed_kmeans():
    scenarios = [load_scenario("ccgc-clustering", ["ccgc.degree=10", "ccgc.homophily=0.7"], seed=s) for s in SEEDS]
    ccgc, raw, smoothed = (np.mean([_nmi(s, m) for s in scenarios])
                           for m in ("centralised", "kmeans-raw", "kmeans-smoothed-full"))
    assert raw <= 0.35  # the regime of the claim: raw features alone cluster poorly
    assert ccgc >= raw + 0.3
    assert ccgc >= smoothed - 0.05


@pytest.mark.slow
def test_federated_ccgc_clusters_far_above_raw_kmeans_and_near_the_clients_smoothed_kmeans():
    scenarios = [load_scenario("ccgc-clustering", seed=s) for s in SEEDS]
    ccgc = np.mean([Reference(s).run("fedavg", keep_models=False)[-1]["nmi"] for s in scenarios])
    raw, smoothed = (np.mean([_nmi(s, m) for s in scenarios]) for m in ("kmeans-raw", "kmeans-smoothed"))
    assert raw <= 0.35
    assert ccgc >= raw + 0.3
    assert ccgc >= smoothed - 0.05


def test_every_baseline_of_a_disjoint_class_federation_is_a_valid_scenario():
    """``one-client`` holds the whole graph: it cannot keep a disjoint-class split."""
    from simulations.launcher import with_overrides
    from workloads.ccgc import BASELINES

    scenario = load_scenario("ccgc-clustering", ["ccgc.partition=disjoint-classes", "ccgc.classes_per_client=2",
                                                 f"ccgc.baselines={list(BASELINES)}"])
    runs = CCGCClustering.baselines(scenario)
    assert set(runs) == set(BASELINES)
    for name, overrides in runs.items():
        assert CCGCClustering.check_scenario(with_overrides(scenario, overrides)) == [], name
