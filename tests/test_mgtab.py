"""MGTAB bot and stance detection: the generator's schema and its relations' information,
MGTAB's file format, the layers (per-relation weights, equal to PyTorch Geometric's),
checkpoint selection on validation macro-F1, determinism, scenario checks, and the paired
acceptance claim on fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.run_config import ScenarioError, client_view
from simulations.launcher import baseline_runs
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from workloads.base import TrainSettings, stack_params
from workloads.mgtab import AGE, MGTABBots
from workloads.mgtab.centralised import scores
from workloads.mgtab.data import (
    PROPERTY_DIM, TRAIN, GeneratorSettings, GraphDataError, generate, load_mgtab, partition,
    relation_homophily, split_nodes, subgraph_edges,
)
from workloads.mgtab.model import RGCNLayer, RelationAttentionLayer, build_graph

torch.set_num_threads(1)
SMALL = ["mgtab.nodes=400", "federation.clients=4", "mgtab.communities=4", "anchors.count=2", "run.rounds=3",
         "mgtab.baselines=[]"]


def _workload(*overrides, seed=0):
    scenario = load_scenario("mgtab-bots", [*SMALL, *overrides], seed=seed)
    return scenario, MGTABBots(client_view(scenario))


# ---- the generator ----------------------------------------------------------------------------


def test_the_generator_has_mgtab_schema_and_is_deterministic_in_its_seed():
    settings = GeneratorSettings(nodes=600, text_dim=12, behaviour_groups=2)
    g = generate(settings, seed=3)
    assert g.features.shape == (600, PROPERTY_DIM + 12) and g.features.dtype == np.float32
    assert g.edge_index.shape == (2, len(g.edge_type)) and set(np.unique(g.edge_type)) == set(range(7))
    assert (g.edge_index[0] < g.edge_index[1]).all()  # undirected, each once per relation, no self-loops
    assert set(np.unique(g.y_bot)) == {0, 1} and set(np.unique(g.y_stance)) == {0, 1, 2}
    assert 0.2 < g.y_bot.mean() < 0.34
    assert (g.features[:, :10] >= 0).all() and (g.features[:, :10] <= 1).all()  # min-max scaled numerics
    assert set(np.unique(g.features[:, 10:20])) == {0.0, 1.0}  # binary flags
    again, other = generate(settings, seed=3), generate(settings, seed=4)
    for name in ("features", "edge_index", "edge_type", "y_bot", "y_stance", "community", "stealth"):
        np.testing.assert_array_equal(getattr(g, name), getattr(again, name), err_msg=name)
    assert not np.array_equal(g.y_bot, other.y_bot)


def test_the_relations_beyond_the_best_pair_reveal_the_stealth_bots():
    """Followers and friends see stealth bots as humans; co-URL and mention edges do not."""
    g = generate(GeneratorSettings(nodes=3000), seed=0)
    stealth = np.flatnonzero(g.stealth)
    visible = np.flatnonzero(g.y_bot.astype(bool) & ~g.stealth)
    human = np.flatnonzero(g.y_bot == 0)
    s, v, h = (relation_homophily(g, nodes) for nodes in (stealth, visible, human))
    for pair in ("followers", "friends"):
        assert abs(s[pair] - h[pair]) < 0.05  # the best pair: a stealth bot's neighbours look like a human's
        assert v[pair] > h[pair] + 0.3  # ... while visible bots cluster
    assert s["url"] > 0.7 and h["url"] < 0.35  # bot campaigns share URLs, stealth bots included
    assert s["mention"] < 0.15 and h["mention"] > 0.35  # bots mention humans
    assert abs(s["quoted"] - h["quoted"]) < 0.06  # noise


def test_odd_behaviour_groups_swap_the_url_and_hashtag_roles_and_flip_the_bot_shift():
    g = generate(GeneratorSettings(nodes=3000, behaviour_groups=2), seed=0)
    group = g.group[g.community]
    for parity, clique, other in ((0, "url", "hashtag"), (1, "hashtag", "url")):
        bots = np.flatnonzero((g.y_bot == 1) & (group == parity))
        share = relation_homophily(g, bots)
        assert share[clique] > 0.6 and share[other] < 0.4, (parity, share)
    visible = (g.y_bot == 1) & ~g.stealth
    gap = [g.features[visible & (group == p), 0].mean() - g.features[(g.y_bot == 0) & (group == p), 0].mean()
           for p in (0, 1)]
    assert gap[0] > 0.03 and gap[1] < -0.03  # the first numeric property deviates either way


def test_partitions_cover_every_user_once_and_clients_keep_only_their_own_edges():
    g = generate(GeneratorSettings(nodes=500, communities=5), seed=1)
    for scheme in ("community", "random"):
        parts = partition(g, 5, scheme, seed=0)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(500))
        kept = 0
        for nodes in parts:
            edges, types = subgraph_edges(g, nodes)
            assert edges.max() < len(nodes) and len(types) == edges.shape[1]
            ends = nodes[edges]
            assert np.isin(ends, nodes).all()
            kept += edges.shape[1]
        if scheme == "community":
            assert kept / g.edge_index.shape[1] > 0.85  # communities keep about nine in ten edges
            assert all(len(np.unique(g.community[p])) == 1 for p in parts)
    split = split_nodes(1000, 0)
    assert np.bincount(split).tolist() == [700, 200, 100]


# ---- MGTAB's released files -------------------------------------------------------------------


def _write_mgtab(folder, n=60, m=300, seed=0, **replace):
    rng = np.random.default_rng(seed)
    tensors = {
        "features.pt": torch.rand(n, 20 + 8), "labels_bot.pt": torch.as_tensor(rng.integers(0, 2, n)),
        "labels_stance.pt": torch.as_tensor(rng.integers(0, 3, n)),
        "edge_index.pt": torch.as_tensor(rng.integers(0, n, (2, m))),
        "edge_type.pt": torch.as_tensor(rng.integers(0, 7, m)), "edge_weight.pt": torch.ones(m),
    }
    tensors.update(replace)
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in tensors.items():
        if value is not None:
            torch.save(value, folder / name)
    return tensors


def test_mgtab_files_are_read_and_run_through_a_scenario(tmp_path):
    tensors = _write_mgtab(tmp_path / "mgtab")
    g = load_mgtab(tmp_path / "mgtab")
    assert g.features.shape == (60, 28) and g.community is None
    np.testing.assert_array_equal(g.y_bot, tensors["labels_bot.pt"].numpy())
    ends = tensors["edge_index.pt"].numpy()
    directed = {(min(a, b), max(a, b), t) for (a, b), t in zip(ends.T, tensors["edge_type.pt"].numpy()) if a != b}
    assert set(zip(*g.edge_index, g.edge_type)) == directed  # undirected, each once per relation
    scenario, workload = _workload("mgtab.source='mgtab'", f"mgtab.data_dir='{tmp_path / 'mgtab'}'",
                                   "federation.clients=2", "anchors.count=1", "mgtab.behaviour_groups=1")
    data = workload.client_data(np.arange(2))  # Louvain communities packed onto two clients
    assert sorted(data.node_ids.tolist()) == list(range(60)) and data.groups is None
    rows = Reference(scenario).run("fedavg", keep_models=False)
    assert len(rows) == 4 and 0 <= rows[-1]["f1_bot"] <= 1


@pytest.mark.parametrize("name, value, message", [
    ("labels_bot.pt", None, "labels_bot.pt: missing"),
    ("labels_bot.pt", torch.zeros(59, dtype=torch.long), r"labels_bot.pt: expected \(60,\) integer classes 0-1"),
    ("labels_stance.pt", torch.full((60,), 3), "labels_stance.pt: expected"),
    ("edge_type.pt", torch.full((300,), 7), "edge_type.pt: expected"),
    ("edge_index.pt", torch.zeros(3, 300, dtype=torch.long), r"edge_index.pt: shape \(3, 300\)"),
    ("features.pt", torch.rand(60, 10), "features.pt: shape"),
    ("edge_weight.pt", {"not": "a tensor"}, "edge_weight.pt: holds dict"),
])
def test_a_bad_mgtab_file_is_named(tmp_path, name, value, message):
    _write_mgtab(tmp_path, **{name: value})
    with pytest.raises(GraphDataError, match=message):
        load_mgtab(tmp_path)


# ---- the layers ------------------------------------------------------------------------------


def _tiny_graph(n=30, m=120, seed=0, types=7):
    rng = np.random.default_rng(seed)
    edges = np.sort(rng.integers(0, n, (2, m)), axis=0)
    edges = np.unique(edges[:, edges[0] != edges[1]], axis=1)
    return edges, rng.integers(0, types, edges.shape[1])


def test_rgcn_keeps_one_weight_per_relation_and_equals_the_dense_formula():
    n = 30
    edges, types = _tiny_graph(n)
    graph = build_graph(n, edges, types, list(range(7)))
    layer = RGCNLayer(8, 7)
    h = torch.randn(n, 8)
    expected = layer.self_weight(h)
    for r in range(7):
        a = np.zeros((n, n))
        e = edges[:, types == r]
        a[e[0], e[1]] = a[e[1], e[0]] = 1
        deg = a.sum(1, keepdims=True)
        mean = torch.as_tensor(np.divide(a, deg, out=np.zeros_like(a), where=deg > 0), dtype=torch.float32)
        expected = expected + mean @ h @ layer.relation_weight[r]
    assert torch.allclose(layer(h, graph), layer.norm(expected), atol=1e-5)
    # a relation without edges gets no gradient: the weights are per relation, not shared
    graph = build_graph(n, edges[:, types != 3], types[types != 3], list(range(7)))
    layer(h, graph).sum().backward()
    grad = layer.relation_weight.grad
    assert grad[3].abs().sum() == 0 and all(grad[r].abs().sum() > 0 for r in range(7) if r != 3)


def test_rgcn_layer_equals_pytorch_geometric_rgcnconv_with_the_same_weights():
    from torch_geometric.nn import RGCNConv

    n = 30
    edges, types = _tiny_graph(n)
    graph = build_graph(n, edges, types, list(range(7)))
    layer, pyg = RGCNLayer(8, 7), RGCNConv(8, 8, 7, aggr="mean")
    with torch.no_grad():
        pyg.weight.copy_(layer.relation_weight)
        pyg.root.copy_(layer.self_weight.weight.T)
        pyg.bias.copy_(layer.self_weight.bias)
    both = torch.as_tensor(np.concatenate([edges, edges[::-1]], axis=1))
    h = torch.randn(n, 8)
    ours = layer.self_weight(h) + torch.sparse.mm(graph.stacked, layer.messages(h))
    assert torch.allclose(ours, pyg(h, both, torch.as_tensor(np.concatenate([types, types]))), atol=1e-5)


def test_the_merged_gcn_product_equals_pytorch_geometric_gcnconv():
    from torch_geometric.nn import GCNConv

    n = 30
    edges, types = _tiny_graph(n)
    graph = build_graph(n, edges, types, [0, 2, 5])
    conv = GCNConv(8, 8, bias=False)
    h = torch.randn(n, 8)
    keep = np.isin(types, [0, 2, 5])
    both = torch.as_tensor(np.concatenate([edges[:, keep], edges[:, keep][::-1]], axis=1))
    ours = torch.sparse.mm(graph.merged, h @ conv.lin.weight.T)
    assert torch.allclose(ours, conv(h, both), atol=1e-5)


def test_relation_attention_weights_each_users_relations_to_one():
    n = 30
    edges, types = _tiny_graph(n)
    graph = build_graph(n, edges, types, list(range(7)))
    layer = RelationAttentionLayer(8, 7)
    h = torch.randn(n, 8)
    m = layer.messages(h).view(7, n, -1)
    m = torch.stack([torch.sparse.mm(a, m[r]) for r, a in enumerate(graph.relations)])
    alpha = torch.softmax(torch.tanh(layer.attend(m)) @ layer.query, dim=0)
    assert alpha.shape == (7, n) and torch.allclose(alpha.sum(0), torch.ones(n))
    assert torch.allclose(layer(h, graph), layer.norm(layer.self_weight(h) + (alpha[..., None] * m).sum(0)),
                          atol=1e-6)


# ---- the workload ----------------------------------------------------------------------------


def test_local_training_is_deterministic_counts_its_age_and_fedprox_pulls_back():
    _, workload = _workload()
    data = workload.client_data(np.array([1, 2]))
    start = stack_params(workload.initial_parameters(), 2)
    settings = TrainSettings(local_steps=4, lr=0.01, server_round=3)
    one, two = workload.local_train(start, data, settings), workload.local_train(start, data, settings)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    assert one[AGE].tolist() == [[1.0], [1.0]]
    moved = sum(float(np.sum((one[n] - start[n]) ** 2)) for n in one if n != AGE)
    prox = workload.local_train(start, data, TrainSettings(local_steps=4, lr=0.01, proximal_mu=100.0,
                                                           server_round=3))
    assert sum(float(np.sum((prox[n] - start[n]) ** 2)) for n in prox if n != AGE) < moved
    assert data.num_examples.tolist() == [int((data.split[data.rows(j)] == TRAIN).sum()) for j in range(2)]


def test_the_checkpoint_is_the_round_with_the_best_validation_macro_f1(monkeypatch):
    _, workload = _workload()
    # (validation bot F1, validation stance F1, test bot F1) of rounds 0.. of two arms
    arm1 = [(0.2, 0.2, 0.9), (0.5, 0.5, 0.6), (0.7, 0.6, 0.7), (0.6, 0.6, 0.95)]
    arm2 = [(0.1, 0.1, 0.3), (0.3, 0.3, 0.4)]
    sequence = iter(arm1 + arm2)

    def evaluate(models):
        vb, vs, tb = next(sequence)
        return {"val_f1_bot": vb, "val_f1_stance": vs, "val_acc_bot": 0.0, "val_acc_stance": 0.0,
                "f1_bot": tb, "acc_bot": tb, "f1_stance": 0.0, "acc_stance": 0.0}

    monkeypatch.setattr(workload, "evaluate", evaluate)
    model = stack_params(workload.initial_parameters(), 1)
    rows = []
    for age in [0, 1, 2, 3, 0, 1]:
        rows.append(workload.central_metrics({**model, AGE: np.full((1, 1), float(age))}))
    # arm 1: round 0 is untrained (never chosen), round 2 has the best validation F1 (mean of both tasks)
    assert [r["f1_bot"] for r in rows[:4]] == [0.9, 0.6, 0.7, 0.7]
    assert [r["round_f1_bot"] for r in rows[:4]] == [0.9, 0.6, 0.7, 0.95]  # not the test-best round 3
    assert rows[3]["selected_age"] == 2
    assert [r["f1_bot"] for r in rows[4:]] == [0.3, 0.4]  # a new arm starts over
    assert workload.central_metrics(model, confusion=np.zeros((1, 1, 4))) == {}  # the clients' choices: no scoring


def test_scores_take_the_truth_first():
    truth, predicted = np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1])
    s = scores(truth, np.zeros(4, int), predicted, np.zeros(4, int))
    # class 0: precision 1, recall 1/3; class 1: precision 1/3, recall 1 (macro-F1 is the same either way round)
    assert s["acc_bot"] == 0.5 and s["f1_bot"] == pytest.approx(0.5) and s["f1_stance"] == pytest.approx(1 / 3)


def test_the_evaluator_scores_each_client_with_the_model_it_would_choose():
    _, workload = _workload("mgtab.behaviour_groups=2")
    data = workload.federation_data
    assert data.groups.tolist() == [0, 1, 0, 1]
    trained = workload.local_train(stack_params(workload.initial_parameters(), 4), data,
                                   TrainSettings(local_steps=30, lr=0.01))
    models = {n: v[:2] for n, v in trained.items()}  # client 0's (group 0) and client 1's (group 1) models
    one = [{n: v[i] for n, v in models.items()} for i in range(2)]
    choice = np.argmin(np.stack([workload.local_loss(m, data) for m in one], axis=1), axis=1)
    assert choice[0] == 0 and choice[1] == 1  # each prefers its own group's model
    bot, stance = workload.predictions(models, data)
    for j in range(4):
        alone = workload.predictions({n: v[choice[j]][None] for n, v in models.items()}, data)
        np.testing.assert_array_equal(bot[data.rows(j)], alone[0][data.rows(j)])
        np.testing.assert_array_equal(stance[data.rows(j)], alone[1][data.rows(j)])


@pytest.mark.parametrize("override, field, message", [
    (["mgtab.communities=3"], "mgtab.communities", "3 communities cannot fill 4 clients"),
    (["mgtab.relations=['followers', 'likes']"], "mgtab.relations", "unknown relation 'likes'"),
    (["mgtab.relations=[]"], "mgtab.relations", "at least one relation"),
    (["mgtab.model='gat'", "mgtab.hidden=30"], "mgtab.hidden", "GAT's 4 heads"),
    (["mgtab.source='mgtab'"], "mgtab.data_dir", "name their folder"),
    (["mgtab.baselines=['centralised-svm']"], "mgtab.baselines", "unknown baseline"),
    (["mgtab.nodes=30"], "mgtab.nodes", "too few"),
    (["mgtab.stealth_share=1.5"], "mgtab.stealth_share", r"\[0, 1\]"),
    (["mgtab.behaviour_groups=4", "run.strategies=['clustered-fedavg']"], "anchors.count", "cannot cover 4"),
])
def test_bad_scenarios_name_the_field(override, field, message):
    with pytest.raises(ScenarioError, match=rf"{field}: .*{message}"):
        load_scenario("mgtab-bots", [*SMALL, *override])


def test_a_missing_mgtab_file_is_named_in_the_scenario_error(tmp_path):
    _write_mgtab(tmp_path, **{"edge_type.pt": None})
    with pytest.raises(ScenarioError, match="mgtab.data_dir: .*edge_type.pt: missing"):
        load_scenario("mgtab-bots", [*SMALL, "mgtab.source='mgtab'", f"mgtab.data_dir='{tmp_path}'"])


def test_baselines_swap_the_model_or_hold_the_whole_graph_on_one_client():
    scenario = load_scenario("mgtab-bots", [*SMALL[:-1], "mgtab.baselines=['fedavg-mlp', 'fedavg-rgcn', "
                                            "'centralised', 'centralised-rgcn-best-pair']"])
    runs = baseline_runs(scenario)
    assert sorted(runs) == ["centralised", "centralised-rgcn-best-pair", "fedavg-mlp"]  # fedavg-rgcn: the scenario
    central, strategy = runs["centralised"]
    assert strategy == "fedavg" and central["federation"]["clients"] == 1
    workload = MGTABBots(client_view(central))
    data = workload.client_data(np.array([0]))
    assert data.edges.shape[1] == workload.graph.edge_index.shape[1]  # every edge, none dropped
    pair = runs["centralised-rgcn-best-pair"][0]["mgtab"]
    assert pair["relations"] == ["followers", "friends"] and pair["model"] == "rgcn"


def test_a_short_federation_is_deterministic_and_clustered_arms_report_ari():
    scenario, _ = _workload("mgtab.behaviour_groups=2", "run.rounds=2", "clustered.anchor_steps=5")
    rows = Reference(scenario).run("clustered-fedavg", keep_models=False)
    again = Reference(scenario).run("clustered-fedavg", keep_models=False)
    assert [r["f1_bot"] for r in rows] == [r["f1_bot"] for r in again]
    assert rows[-1]["ari"] is not None and -1 <= rows[-1]["ari"] <= 1
    assert rows[-1]["selected_age"] >= 1


# ---- the paired claim (slow) -------------------------------------------------------------------


def _baseline_f1(seed: int, name: str) -> float:
    """One centralised reference run (picklable, for ``on_both_cores``): its final bot F1."""
    scenario = load_scenario("mgtab-bots", ["mgtab.nodes=2000", "run.strategies=['fedavg']",
                                            "mgtab.baselines=['centralised', 'centralised-mlp', "
                                            "'centralised-rgcn-best-pair']"], seed=seed)
    sc, strategy = baseline_runs(scenario)[name]
    return Reference(sc).run(strategy, keep_models=False)[-1]["f1_bot"]


@pytest.mark.slow
def test_rgcn_on_seven_relations_beats_the_mlp_and_the_best_pair_on_every_seed():
    """Centralised (one client holding the whole graph, the scenario's recipe) on the
    scenario's graph at 2,000 users (half the default, for time), seeds 0-4, paired.
    Pilot (benchmarks/mgtab.py at 2,000 users): RGCN-7 - MLP +0.30 (worst seed +0.23),
    RGCN-7 - best pair +0.16 (worst +0.08), RGCN-7 sd 0.022; the margins are set below.
    The spread over seeds is a comparison, not a number: an sd from five seeds is itself
    uncertain by about a third, and a bound of 0.03 failed on another machine (RGCN sd 0.046,
    MLP 0.046, best pair 0.062; float paths differ between CPUs)."""
    from conftest import on_both_cores

    names = ("centralised", "centralised-mlp", "centralised-rgcn-best-pair")
    f1 = on_both_cores([(_baseline_f1, seed, name) for seed in range(5) for name in names])
    rgcn, mlp, pair = (np.array(f1[i::3]) for i in range(3))
    assert (rgcn - mlp).mean() >= 0.1 and (rgcn - mlp).min() > 0.1, (rgcn, mlp)
    assert (rgcn - pair).mean() >= 0.05 and (rgcn - pair).min() > 0.03, (rgcn, pair)
    assert rgcn.std() <= max(mlp.std(), pair.std()), (rgcn, mlp, pair)  # no less stable than the baselines
