"""The linear workload: generator statistics, local training, and its pure-numpy FedAvg."""

import numpy as np
import pytest

from server.run_config import resolve
from proto.wire import ClientBatch
from strategies.aggregation import weighted_average
from workloads.base import TrainSettings, stack_params
from workloads.mixed_regression import MixedRegression, estimation_error, true_models


def make(**sections):
    raw = {"federation": {"clients": 3000}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return MixedRegression(resolve(raw))


def test_zipf_sizes_are_heavy_tailed_and_capped():
    wl = make(federation={"size_law": "zipf", "zipf_exponent": 1.6, "max_size": 200})
    data = wl.client_data(np.arange(wl.anchor_count, 3000))
    n = data.num_examples
    small = np.mean(n <= 2)
    # P(Zipf(1.6) <= 2) = (1 + 2^-1.6) / zeta(1.6) = 0.611
    assert abs(small - 0.611) < 0.03
    assert n.min() == 1 and n.max() <= 200


def test_uniform_and_fixed_size_laws_stay_in_range():
    wl = make(federation={"size_law": "uniform", "min_size": 3, "max_size": 7})
    n = wl.client_data(np.arange(3000)).num_examples
    assert set(np.unique(n)) == {3, 4, 5, 6, 7}
    wl = make(federation={"size_law": "fixed", "min_size": 4, "max_size": 4})
    assert (wl.client_data(np.arange(100)).num_examples == 4).all()


def test_labels_follow_cluster_weights_and_anchors_cover_clusters():
    wl = make(
        mixed_regression={"clusters": 3, "cluster_weights": [0.6, 0.3, 0.1]},
        anchors={"count": 6, "size": 40},
    )
    data = wl.client_data(np.arange(3000))
    share = np.bincount(data.labels[6:], minlength=3) / len(data.labels[6:])
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.03)
    assert list(data.labels[:6]) == [0, 1, 2, 0, 1, 2]
    assert (data.num_examples[:6] == 40).all()


def test_true_models_have_exactly_the_requested_separation():
    theta = true_models(seed=3, k=5, dim=10, separation=0.7)
    d = np.linalg.norm(theta[:, None] - theta[None], axis=2)
    assert np.isclose(d[np.triu_indices(5, 1)].min(), 0.7)


def test_noise_level_matches_sigma():
    wl = make(mixed_regression={"noise": 0.3})
    data = wl.client_data(np.arange(3000))
    fitted = np.einsum("pd,pd->p", data.x, wl.true_models[np.repeat(data.labels, data.num_examples)])
    assert abs(np.std(data.y - fitted) - 0.3) < 0.01


def test_client_data_do_not_depend_on_the_cohort():
    wl = make()
    whole = wl.client_data(np.arange(2040, 2060))  # straddles a generation block
    for cid in (2040, 2047, 2059):
        alone = wl.client_data(np.array([cid]))
        i = cid - 2040
        lo, hi = whole.starts[i], whole.starts[i] + whole.num_examples[i]
        assert np.array_equal(alone.x, whole.x[lo:hi]) and np.array_equal(alone.y, whole.y[lo:hi])
    # a fresh workload (another process) regenerates the same data
    assert np.array_equal(make().client_data(np.arange(2040, 2060)).y, whole.y)


def test_client_ids_outside_the_federation_are_rejected():
    with pytest.raises(ValueError, match=r"client ids must lie in \[0, 3000\)"):
        make().client_data(np.array([2999, 3000]))


def test_fedavg_one_cluster_full_participation_is_centralised_gd():
    """One local step from the global model, example-weighted average: exactly GD on the
    pooled mean squared loss (no client hits the step cap at this step size)."""
    wl = make(
        federation={"clients": 200, "size_law": "uniform", "min_size": 30, "max_size": 60},
        mixed_regression={"clusters": 1},
    )
    data = wl.client_data(np.arange(200))
    lr = 0.05
    assert (lr < 0.5 / data.lambda_max).all()
    w_fed = w_gd = np.zeros(wl.dim)
    for _ in range(25):
        trained = wl.local_train(stack_params({"w": w_fed}, 200), data, TrainSettings(local_steps=1, lr=lr))
        w_fed = weighted_average(ClientBatch(data.client_ids, data.num_examples, trained, {}))["w"]
        grad = 2 * data.x.T @ (data.x @ w_gd - data.y) / len(data.y)
        w_gd = w_gd - lr * grad
    assert np.abs(w_fed - w_gd).max() < 1e-8
    assert np.linalg.norm(w_gd - wl.true_models[0]) < 0.2  # and GD did move toward the truth


def test_fedprox_closed_form_minimises_the_proximal_objective():
    wl = make(federation={"clients": 50})
    data = wl.client_data(np.arange(50))
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((50, wl.dim))}
    mu = 0.7
    w = wl.local_train(start, data, TrainSettings(local_steps=5, lr=0.3, proximal_mu=mu))["w"]
    for i in range(50):
        sl = slice(data.starts[i], data.starts[i] + data.num_examples[i])
        x, y, n = data.x[sl], data.y[sl], data.num_examples[i]
        grad = 2 * x.T @ (x @ w[i] - y) / n + mu * (w[i] - start["w"][i])
        assert np.abs(grad).max() < 1e-9  # stationary point of a strictly convex objective


def test_step_cap_keeps_one_point_clients_stable():
    wl = make(federation={"clients": 400, "size_law": "fixed", "min_size": 1, "max_size": 1})
    data = wl.client_data(np.arange(400))
    start = stack_params({"w": np.zeros(wl.dim)}, 400)
    w = wl.local_train(start, data, TrainSettings(local_steps=50, lr=10.0))["w"]
    assert np.isfinite(w).all()
    # each client's loss went down, never up
    before = data.y**2
    after = (np.einsum("pd,pd->p", data.x, w) - data.y) ** 2
    assert (after <= before + 1e-12).all()


def test_estimation_error_uses_the_best_matching():
    truth = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    est = truth[[2, 0, 1]] + np.array([[0.1, 0], [0, 0.2], [0, 0]])
    assert np.isclose(estimation_error(est, truth), 0.2)
    # a single model is compared with every true model
    assert np.isclose(estimation_error(np.zeros((1, 2)), truth), 1.0)
    # the bottleneck matching (max 6), not the min-sum one (0 + 10)
    truth = np.array([[0.0, 0.0], [6.0, 0.0]])
    est = np.array([[0.0, 0.0], [-7 / 3, np.sqrt(275 / 9)]])
    assert np.isclose(estimation_error(est, truth), 6.0)
