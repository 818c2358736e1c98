"""Active learning by gradient norm: scoring rules, the federation split, label queries,
and the paired statistical claims (centralised and federated) with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.compute import begin_round
from server.run_config import ScenarioError, client_view
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from workloads.active_learning import ActiveLearning
from workloads.active_learning.data import MIN_POOL, apportion, digits, split_federation
from workloads.active_learning.model import DigitsCNN
from workloads.active_learning.scoring import (
    GRADNORM_LOSSES,
    egl_scores,
    entropy_loss,
    gradnorm_scores,
    gradnorm_scores_loop,
    score_pool,
    top_k,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(3)
    model = DigitsCNN()
    images = torch.from_numpy(digits()[0][:64])
    return model, images


# ---- scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["expected-gradnorm", "entropy-gradnorm"])
def test_batched_gradnorm_equals_the_one_at_a_time_loop(model_and_images, rule):
    model, images = model_and_images
    batched = gradnorm_scores(model, images, GRADNORM_LOSSES[rule])
    loop = gradnorm_scores_loop(model, images, GRADNORM_LOSSES[rule])
    assert torch.allclose(batched, loop, rtol=1e-5, atol=1e-7)
    assert loop.std() > 0  # the scores separate samples


def test_expected_and_entropy_gradnorm_coincide_for_cross_entropy(model_and_images):
    """sum_c p_c CE(z, c) = H(p) as functions of the logits: same scores, same selections."""
    model, images = model_and_images
    expected = score_pool("expected-gradnorm", model, images)
    entropy = score_pool("entropy-gradnorm", model, images)
    assert np.allclose(expected, entropy, rtol=1e-4)
    assert np.array_equal(top_k(expected, 10), top_k(entropy, 10))


def test_detaching_the_expectation_weights_gives_a_zero_score(model_and_images):
    """With p detached, sum_c p_c grad(-log p_c) = -grad sum_c p_c = 0 (the spec's warning)."""
    model, images = model_and_images

    def detached_expected(logits):
        classes = torch.arange(logits.shape[-1])
        ce = F.cross_entropy(logits.expand(len(classes), -1), classes, reduction="none")
        return (F.softmax(logits, -1).detach() * ce).sum()

    assert gradnorm_scores(model, images[:8], detached_expected).abs().max() < 1e-5


def test_gradnorm_sums_per_tensor_norms_rather_than_one_global_norm(model_and_images):
    model, images = model_and_images
    x = images[:1]
    model.zero_grad()
    entropy_loss(model(x)[0]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    per_tensor = sum(g.norm() for g in grads)
    global_norm = torch.sqrt(sum((g**2).sum() for g in grads))
    score = gradnorm_scores(model, x, entropy_loss)[0]
    assert torch.isclose(score, per_tensor, rtol=1e-5)
    assert score > global_norm * 1.01  # a different quantity, not a rescaling artefact


def test_egl_is_the_expected_gradient_length(model_and_images):
    """EGL = sum_c p_c ||grad CE(z, c)|| with p constant: checked against a plain loop, and
    it ranks samples differently from the gradnorm rules."""
    model, images = model_and_images
    x = images[:4]
    loop = []
    for xi in x:
        logits = model(xi[None])
        p = F.softmax(logits, -1)[0].detach()
        total = 0.0
        for c in range(10):
            g = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), list(model.parameters()),
                                    retain_graph=True)
            total += p[c] * torch.sqrt(sum((gi**2).sum() for gi in g))
        loop.append(total)
    assert torch.allclose(egl_scores(model, x), torch.stack(loop), rtol=1e-4)
    egl = score_pool("egl", model, images)
    gradnorm = score_pool("entropy-gradnorm", model, images)
    assert not np.array_equal(top_k(egl, 10), top_k(gradnorm, 10))


def test_unknown_or_model_free_rule_is_refused(model_and_images):
    model, images = model_and_images
    with pytest.raises(ValueError, match="no model-based selection rule 'margin'"):
        score_pool("margin", model, images)
    with pytest.raises(ValueError, match="'random'"):
        score_pool("random", model, images)


def test_top_k_breaks_ties_toward_the_lower_position():
    assert top_k(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 2]
    assert top_k(np.array([1.0, 2.0]), 0).tolist() == []


# ---- the federation --------------------------------------------------------------------


def test_apportion_is_proportional_exact_and_respects_the_minimum():
    share = apportion(40, np.array([268, 266, 86, 33, 5.0]), minimum=1)
    assert share.sum() == 40 and share.min() >= 1
    assert list(share) == sorted(share, reverse=True)
    assert apportion(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]  # ties: lower index
    with pytest.raises(ValueError, match="at least 2"):
        apportion(3, np.ones(2), minimum=2)


def test_split_covers_the_pool_once_and_skews_labels_with_alpha():
    images, targets = digits()
    split = split_federation(0, 10, 0.5, 500, 40, 40)
    everything = np.concatenate([split.test, *split.pools])
    assert len(everything) == len(targets) == len(np.unique(everything))
    assert min(len(p) for p in split.pools) >= MIN_POOL
    assert sum(len(s) for s in split.seed_sets) == 40 and split.budget.sum() == 40
    assert split_federation(0, 10, 0.5, 500, 40, 40) is split  # cached, deterministic

    def mean_label_entropy(alpha):
        pools = split_federation(1, 10, alpha, 500, 40, 40).pools
        ent = []
        for p in pools:
            q = np.bincount(targets[p], minlength=10) / len(p)
            ent.append(-(q[q > 0] * np.log(q[q > 0])).sum())
        return np.mean(ent)

    assert mean_label_entropy(0.1) < mean_label_entropy(0.5) < mean_label_entropy(100.0)


def _workload(*overrides, seed=0):
    scenario = load_scenario("active-learning", list(overrides), seed=seed)
    return scenario, ActiveLearning(client_view(scenario))


def test_a_client_sees_the_same_pool_in_any_cohort():
    _, wl = _workload()
    whole = wl.client_data(np.arange(10))
    alone = wl.client_data(np.array([3]))
    lo, hi = whole.starts[3], whole.starts[4]
    assert np.array_equal(alone.images, whole.images[lo:hi])
    assert np.array_equal(alone.seed_set, whole.seed_set[lo:hi])


def _models(wl):
    return {n: v[None] for n, v in wl.initial_parameters().items()}


@pytest.mark.parametrize("rule", ["random", "entropy-gradnorm"])
def test_queries_do_not_depend_on_the_cohort_split(rule):
    scenario, wl = _workload()
    fed, models = scenario["federation"], _models(wl)
    whole = wl.client_data(np.arange(10))
    state = wl.initial_state(whole)
    _, state, _ = begin_round(wl, whole, models, state, round_=6, variant=rule, federation=fed)
    singles = []
    for c in range(10):
        data = wl.client_data(np.array([c]))
        _, s, _ = begin_round(wl, data, models, wl.initial_state(data), round_=6, variant=rule,
                              federation=fed)
        singles.append(s["labeled"])
    assert np.array_equal(state["labeled"], np.concatenate(singles))


def test_a_query_round_reveals_each_share_of_the_highest_scores():
    scenario, wl = _workload()
    fed, models = scenario["federation"], _models(wl)
    data = wl.client_data(np.arange(10))
    start = wl.initial_state(data)
    # Round 2 is not a query round (queries at 6, 11, ...): nothing changes.
    same, state, metrics = begin_round(wl, data, models, start, round_=2, variant="entropy",
                                       federation=fed)
    assert np.array_equal(state["labeled"], start["labeled"]) and metrics["queried"].sum() == 0
    trained_on, state, metrics = begin_round(wl, data, models, start, round_=6, variant="entropy",
                                             federation=fed)
    before, after = start["labeled"].astype(bool), state["labeled"].astype(bool)
    assert (after >= before).all()  # labels are never withdrawn
    assert np.array_equal(metrics["queried"], data.budget) and metrics["clipped"].sum() == 0
    assert np.array_equal(trained_on.num_examples, same.num_examples + data.budget)
    scores = score_pool("entropy", wl._model, torch.from_numpy(data.images))
    for j in range(10):
        lo, hi = data.starts[j], data.starts[j + 1]
        new = after[lo:hi] & ~before[lo:hi]
        rest = ~after[lo:hi]
        if rest.any():
            assert scores[lo:hi][new].min() >= scores[lo:hi][rest].max()


def test_exhausted_pools_clip_the_budget_and_the_run_goes_on():
    """A tiny pool (100 images over 10 clients): small clients run out of unlabeled images;
    they reveal what is left, the shortfall is reported as clipped, never a crash."""
    scenario = load_scenario("active-learning", [
        "active_learning.test_size=1697", "active_learning.initial_labels=10",
        "active_learning.budget=30", "run.rounds=7", "active_learning.rounds_per_cycle=2",
        "train.local_steps=2", "active_learning.rules=['entropy-gradnorm']"])
    rows = Reference(scenario).run("fedavg", variant="entropy-gradnorm")
    assert sum(r.get("clipped", 0) for r in rows) > 0
    final = rows[-1]
    requested = 10 + 30 * 3
    assert final["examples"] + sum(r.get("clipped", 0) for r in rows) == pytest.approx(requested)
    assert final["examples"] <= 100 and np.isfinite(final["accuracy"])


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (["active_learning.budget=400"], "active_learning.budget", "exceeds the pool of 1297"),
        (["active_learning.rules=['random', 'margin']"], "active_learning.rules", "unknown selection rule 'margin'"),
        (["active_learning.rules=[]"], "active_learning.rules", "at least one"),
        (["run.strategies=['ifca']"], "run.strategies", "trains one global model"),
        (["active_learning.initial_labels=5"], "active_learning.initial_labels", "at least one label"),
        (["active_learning.test_size=1797"], "active_learning.test_size", "leaves no pool"),
        (["federation.clients=600", "active_learning.initial_labels=600", "active_learning.alpha=0.01"],
         "active_learning.alpha", "fewer than 2 images"),
        (["active_learning.centralised=1"], "active_learning.centralised", "expected bool"),
    ],
)
def test_bad_scenarios_name_the_field(overrides, field, message):
    with pytest.raises(ScenarioError) as err:
        load_scenario("active-learning", overrides)
    fields = dict(err.value.problems)
    assert field in fields, err.value
    assert message in fields[field]


# ---- the paper's claim, paired over seeds ---------------------------------------------

SEEDS = range(3)  # the pilot's per-seed gains are quoted in each test


def _final_and_auc(rule, seed, *overrides):
    scenario = load_scenario("active-learning", list(overrides), seed=seed)
    rows = Reference(scenario).run("fedavg", variant=rule, keep_models=False)
    from simulations.report import curve_points

    pts = curve_points(rows, "accuracy")
    return pts[-1][1], np.mean([acc for _, acc in pts]), pts[-1][0]


@pytest.mark.slow
def test_centralised_entropy_gradnorm_beats_random_by_a_point():
    """Calibrated on a pilot (benchmarks/active_learning.py): +2.2, +5.6, +0.8 points on
    seeds 0-2 at 240 labels (+5.2, +3.8 on seeds 3-4, left out for time); the issue asks
    for at least +1 on average."""
    from conftest import on_both_cores

    one_client = ("federation.clients=1", "federation.cohort_size=1")
    runs = iter(on_both_cores([(_final_and_auc, rule, seed, *one_client)
                               for seed in SEEDS for rule in ("entropy-gradnorm", "random")]))
    gain, auc_gain = [], []
    for (g_final, g_auc, labels), (r_final, r_auc, _) in zip(runs, runs):
        assert labels == 240
        gain.append(g_final - r_final)
        auc_gain.append(g_auc - r_auc)
    assert np.mean(gain) >= 0.01, gain
    assert np.mean(auc_gain) > 0, auc_gain


@pytest.mark.slow
def test_federated_entropy_gradnorm_ends_above_random():
    """10 clients, Dirichlet 0.5. Pilot (benchmarks/active_learning.py): +5.2, +15.2, 0.0
    points on seeds 0-2 at 240 labels (+13.2, +3.6 on seeds 3-4, left out for time)."""
    from conftest import on_both_cores

    runs = iter(on_both_cores([(_final_and_auc, rule, seed) for seed in SEEDS for rule in ("entropy-gradnorm", "random")]))
    gain = []
    for (g_final, _, labels), (r_final, _, _) in zip(runs, runs):
        assert labels == 240
        gain.append(g_final - r_final)
    assert np.mean(gain) > 0.02, gain
    assert sum(g >= 0 for g in gain) >= 2, gain


# ---- through Flower ---------------------------------------------------------------------


@pytest.mark.slow
def test_flower_run_keeps_labels_across_rounds_and_matches_the_reference(ray_cluster, tmp_path):
    """Each cohort's labeled set lives in Flower's context.state between rounds; the run
    equals the in-process reference, and the centralised baselines are recorded."""
    from server.record import load_history
    from simulations.launcher import simulate

    rules = ["random", "entropy-gradnorm"]
    scenario = load_scenario("active-learning", [
        "federation.clients=4", "federation.cohort_size=2", "run.rounds=5",
        "active_learning.rounds_per_cycle=2", f"active_learning.rules={rules}",
        "train.local_steps=3", "active_learning.initial_labels=8", "active_learning.budget=8"])
    run_dir = simulate(scenario, out=tmp_path, ray_address=ray_cluster)
    history = load_history(run_dir)
    assert set(history["strategies"]) == {f"{arm}/{r}" for arm in ("fedavg", "centralised") for r in rules}
    ref = Reference(scenario)
    for rule in rules:
        rows = history["strategies"][f"fedavg/{rule}"]
        assert [r["examples"] for r in rows[1:]] == [8, 8, 16, 16, 24]  # queries at rounds 3, 5
        for f, r in zip(rows, ref.run("fedavg", variant=rule), strict=True):
            assert f["accuracy"] == r["accuracy"]
            assert abs(f["loss"] - r["loss"]) < 1e-9
        assert history["strategies"][f"centralised/{rule}"][-1]["examples"] == 24
    assert (run_dir / "learning_curve.png").is_file()
