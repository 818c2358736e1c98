"""Backdoors through dataset distillation: the mechanics (fast), the upload checks and the
robust aggregators (fast, no Flower run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message

from proto.wire import ClientBatch, encode_batch, params_to_record
from server.history import detection_rates
from strategies.data_union import DataUnion, UploadTrainer, check_upload
from strategies.robust import CohortFedAvgClip, CohortFedMedian, CohortKrum
from workloads.backdoor import data as D
from workloads.backdoor import distill as X
from workloads.backdoor.model import ConvNetMini, fresh

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower run need the identity the ServerApp would have."""
    from server.flower_patches import allow_messages_outside_a_run

    allow_messages_outside_a_run()


@pytest.fixture(scope="module")
def digits():
    return D.load(0, 497)


def doorping_client(digits, outer=3, seed=0):
    """A malicious client's distillation on 130 images, 30% poisoned."""
    attack = X.Attack(kind="doorping", portion=0.3, clamp=False)
    x, y = digits.x_train[:130], digits.y_train[:130]
    rng = np.random.default_rng(seed)
    mask = D.patch_mask(2)
    poisoned = D.poison_index(len(y), attack.portion, seed, 0)
    trigger = X.initial_trigger(attack, mask, (digits.low, digits.high), rng)
    settings = X.DCSettings(ipc=2, outer=outer, inner=2)
    return X.start(x, y, poisoned, mask, trigger, attack, settings, (digits.low, digits.high), rng), attack, settings


def test_trigger_update_changes_pixels_only_inside_the_mask(digits):
    d, attack, _ = doorping_client(digits)
    before = d.trigger.copy()
    after, info = X.update_trigger(fresh(1), before, d.mask, attack, d.bounds)
    outside = d.mask == 0
    assert np.array_equal(after[outside], before[outside]) and (after[outside] == 0).all()
    assert np.abs(after - before)[~outside].max() > 0.1  # and it did move inside
    assert info["steps"] > 0


def test_doorping_boosts_the_chosen_neuron_at_least_5x(digits, monkeypatch):
    """Over one DOORPING iteration (9 trigger updates, each aiming at 10x the neuron's value),
    the neuron chosen on the last network responds to the final trigger at least 5x as
    strongly as to the initial one (same sign). A neuron whose value hardly depends on the
    patch (dead ReLU paths) cannot be moved, by this code or the paper's: one seed in six
    here, so the test asks for five of six."""
    nets = []
    real_update = X.update_trigger

    def recording_update(net, *args, **kwargs):
        nets.append(net)
        return real_update(net, *args, **kwargs)

    monkeypatch.setattr(X, "update_trigger", recording_update)
    ratios = []
    for seed in range(1, 7):
        d, attack, settings = doorping_client(digits, outer=10, seed=seed)
        first = d.trigger.copy()
        X.iterate(d, attack, settings, seed=seed)
        net = nets[-1]
        neuron = X.select_neuron(net)
        with torch.no_grad():
            before, after = (X.neuron_value(net, torch.as_tensor(t[None]), neuron).item() for t in (first, d.trigger))
        ratios.append(after / before)
    assert sum(r >= 5.0 for r in ratios) >= 5, ratios


def test_chosen_neuron_is_the_largest_incoming_l1_of_the_penultimate_linear():
    net = ConvNetMini()
    with torch.no_grad():
        net.hidden.weight.mul_(0.01)
        net.hidden.weight[37].fill_(0.5)
    assert X.select_neuron(net) == 37
    assert net.hidden.out_features == 64 and net.hidden.in_features == 128  # 128 -> 64: penultimate
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(X.neuron_value(net, x, 37), net.pre_hidden(x)[:, 37])


def test_poisoned_pool_is_restamped_after_every_trigger_update(digits, monkeypatch):
    d, attack, settings = doorping_client(digits, outer=4)
    triggers, pools = [], []
    real_update = X.update_trigger

    def recording_update(*args, **kwargs):
        new, info = real_update(*args, **kwargs)
        triggers.append(new.copy())
        return new, info

    real_pool = X.Distillation.pool

    def recording_pool(self):
        x, y = real_pool(self)
        pools.append(x[self.poisoned].copy())
        return x, y

    monkeypatch.setattr(X, "update_trigger", recording_update)
    monkeypatch.setattr(X.Distillation, "pool", recording_pool)
    initial = d.trigger.copy()
    X.iterate(d, attack, settings, seed=5)
    assert len(triggers) == settings.outer - 1  # after every network update but the last
    # The pool read by image update i (i >= 1) carries the trigger of update i - 1.
    for i, trigger in enumerate(triggers, start=1):
        expected = D.stamp(d.x[d.poisoned], d.mask, trigger)
        assert np.array_equal(pools[i], expected)
    assert np.array_equal(pools[0], D.stamp(d.x[d.poisoned], d.mask, initial))
    assert not np.array_equal(triggers[0], initial)
    assert (d.y[d.poisoned] == attack.target).all()  # relabelled to the target


def test_naive_attack_keeps_its_white_patch(digits):
    attack = X.Attack(kind="naive", portion=0.3)
    mask = D.patch_mask(2)
    trigger = X.initial_trigger(attack, mask, (digits.low, digits.high), None)
    assert np.allclose(trigger[mask > 0], digits.high) and (trigger[mask == 0] == 0).all()
    x, y = digits.x_train[:130], digits.y_train[:130]
    rng = np.random.default_rng(0)
    d = X.start(x, y, D.poison_index(130, 0.3, 0, 0), mask, trigger, attack, X.DCSettings(ipc=2, outer=2, inner=1),
                (digits.low, digits.high), rng)
    X.iterate(d, attack, X.DCSettings(ipc=2, outer=2, inner=1), seed=0)
    assert np.array_equal(d.trigger, trigger)
    assert len(d.poisoned) == 39


def scenario_workload(*overrides: str, cls=None, **kwargs):
    """The workload as a run builds it: from the scenario file, through its own constructor."""
    from simulations.scenarios import load_scenario
    from workloads.backdoor import BackdoorDistillation

    scenario = load_scenario("backdoor-doorping", ["federation.clients=2", "backdoor.ipc=2", "backdoor.outer=3",
                                                   "backdoor.inner=2", "backdoor.iterations_per_round=1",
                                                   *overrides])
    return (cls or BackdoorDistillation)(scenario, **kwargs)


def one_round(wl, variant: str = "doorping") -> tuple[np.ndarray, np.ndarray]:
    """Client 0's trigger after its distillation started (the first trigger) and after one
    DC iteration of ``update_state``."""
    data = wl.client_data(np.array([0]))
    state = wl.initial_state(data)
    first = wl.distillation(data, state, 0, variant)[0].trigger.copy()
    state, _ = wl.update_state({}, data, state, 1, variant, np.ones(1, bool))
    return first, state["trigger"][0]


def test_scenario_doorping_moves_its_trigger_in_one_iteration():
    """The scenario's settings reach DOORPING by name (a positional ``Attack(...)`` once set
    its Adam step to ``bool(clamp)``, zero, and the trigger never moved)."""
    wl = scenario_workload("backdoor.alpha=7.0", "backdoor.trigger_steps=50", "backdoor.tolerance=0.2")
    assert wl.attack == X.Attack(kind="doorping", target=0, portion=0.3, size=2, alpha=7.0, max_steps=50,
                                 tolerance=0.2, clamp=False)
    assert wl.attack.lr == X.Attack().lr > 0
    first, after = one_round(wl)
    inside = wl.mask > 0
    assert np.abs(after - first)[inside].max() > 0.1
    assert (after[~inside] == 0).all()


def test_clamped_doorping_stays_in_the_pixel_range_and_still_moves():
    wl = scenario_workload("backdoor.clamp=true")
    low, high = wl.bounds
    first, after = one_round(wl)
    inside = wl.mask > 0
    assert low - 1e-6 <= after[inside].min() and after[inside].max() <= high + 1e-6
    assert np.abs(after - first)[inside].max() > 0.01


def test_settings_built_from_scenario_tables_refuse_positional_arguments():
    from server.engine import Arm
    from workloads.base import TrainSettings
    from workloads.federation import Participation

    for cls, args in ((X.Attack, ("doorping", 0)), (X.DCSettings, (10, 10)), (TrainSettings, (1, 0.1)),
                      (Participation, (None,) * 5), (Arm, (None,) * 3)):
        with pytest.raises(TypeError, match="positional"):
            cls(*args)


def test_magnitude_matched_control_keeps_the_preset_trigger():
    """``naive-large``: NAIVEATTACK distils with the given trigger from the start and keeps
    it; honest clients start from no trigger at all."""
    from workloads.backdoor.experiment import PresetTrigger

    preset = np.full((1, 8, 8), 500.0, np.float32)
    wl = scenario_workload("backdoor.attack='naive'", cls=PresetTrigger, trigger=preset)
    first, after = one_round(wl, "naive")
    assert np.array_equal(first, preset * wl.mask) and np.array_equal(after, first)
    assert not one_round(wl, "clean")[0].any()


def test_server_range_check_sees_the_raw_uploads_and_clipping_repairs_them():
    """``range-check`` flags the client whose upload leaves the pixel range, also when the
    server clips (``clip_uploads``); the clipped server trains on exactly the clipped union."""
    from workloads.backdoor.defenses import clip_to_range

    fast = ("backdoor.server_epochs=3", "backdoor.defenses=['range-check']")
    plain, clipping = scenario_workload(*fast), scenario_workload(*fast, "backdoor.clip_uploads=true")
    rng = np.random.default_rng(0)
    low, high = plain.bounds
    images = rng.uniform(low, high, (40, 1, 8, 8)).astype(np.float32)
    labels, owners = np.tile(np.arange(10), 4), np.repeat([3, 5, 7, 9], 10)
    images[12, 0, 6, 6] = 50 * high  # client 5
    params, flags = clipping.server_train(images, labels, owners, 1)
    expected, plain_flags = plain.server_train(clip_to_range(images, plain.bounds), labels, owners, 1)
    assert flags == {"range-check": [5]} and plain_flags == {"range-check": []}
    assert all(np.array_equal(params[n], expected[n]) for n in expected)
    unclipped, _ = plain.server_train(images, labels, owners, 1)
    assert not all(np.array_equal(unclipped[n], expected[n]) for n in expected)


def test_asr_of_the_paper_and_of_its_code():
    """The paper's ASR counts triggered images of the other classes; its code's, all of them."""
    from workloads.backdoor.model import attack_success, attack_success_all

    class Always(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.int64), 10).float()

    x, y = np.zeros((10, 1, 8, 8), np.float32), np.array([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert attack_success(Always(), x, y, 0) == 1.0 and attack_success_all(Always(), x, 0) == 1.0
    assert attack_success(Always(), x, y, 1) == 0.0 and attack_success_all(Always(), x, 1) == 0.0

    class Truth(torch.nn.Module):  # predicts the class written in the first pixel
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()

    x[:, 0, 0, 0] = y
    assert attack_success(Truth(), x, y, 0) == 0.0 and attack_success_all(Truth(), x, 0) == 0.2


def test_batched_matching_equals_the_per_class_loop(digits):
    """The vmapped per-class gradient matching gives DC's per-class loss and image gradients."""
    net = fresh(0)
    params = list(net.parameters())
    x, y = digits.x_train[:60], digits.y_train[:60]
    classes = sorted(set(y.tolist()))
    syn = torch.randn(len(classes) * 2, 1, 8, 8, requires_grad=True)
    syn_y = np.repeat(classes, 2)
    loop = torch.zeros(())
    for c in classes:
        g_real = [g.detach() for g in torch.autograd.grad(
            F.cross_entropy(net(torch.as_tensor(x[y == c])), torch.as_tensor(y[y == c])), params)]
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn[torch.as_tensor(syn_y == c)]),
                                                    torch.as_tensor(syn_y[syn_y == c])), params, create_graph=True)
        for gr, gs in zip(g_real, g_syn):
            if gr.dim() > 1:
                gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
                loop = loop + (1 - (gr * gs).sum(1) / (gr.norm(dim=1) * gs.norm(dim=1) + 1e-6)).sum()
    loop_grad = torch.autograd.grad(loop, syn)[0]
    weights = {n: p.detach() for n, p in net.named_parameters()}
    grads = X.class_gradients(net)
    ri, rw = X.padded_classes(y, classes)
    si, sw = X.padded_classes(syn_y, classes)
    lab = lambda idx: torch.as_tensor(np.asarray(classes))[:, None].expand(idx.shape)  # noqa: E731
    batched = X.batched_match(
        {n: g.detach() for n, g in grads(weights, torch.as_tensor(x[ri]), lab(ri), torch.as_tensor(rw)).items()},
        grads(weights, syn[torch.as_tensor(si)], lab(si), torch.as_tensor(sw)))
    assert batched.item() == pytest.approx(loop.item(), rel=1e-5)
    assert torch.allclose(torch.autograd.grad(batched, syn)[0], loop_grad, atol=1e-5)


# ---- uploads and the data-union strategy --------------------------------------------------

ANNOUNCED = {"images": (20, 1, 8, 8), "labels": (20,)}


def upload(n=20, fill=0.5, labels=None):
    images = np.full((n, 1, 8, 8), fill, np.float32)
    return images, np.arange(n) % 10 if labels is None else labels


@pytest.mark.parametrize("images, labels, expected", [
    (*upload(), None),
    (np.zeros((20, 1, 7, 7), np.float32), np.arange(20) % 10, "images of shape (20, 1, 7, 7), expected (20, 1, 8, 8)"),
    (*upload(labels=np.arange(20)), "labels out of range (0..19; classes are 0..9)"),
    (*upload(labels=-np.ones(20, np.int64)), "labels out of range"),
    (*upload(fill=np.nan), "1280 non-finite pixel values"),
    (*upload(n=5000), "upload of 5000 images is larger than the 20 announced"),
    (np.zeros((20, 1, 8, 8), np.float32), np.zeros(19, np.int64), "labels of shape (19,), expected (20,)"),
])
def test_check_upload_names_the_problem(images, labels, expected):
    problem = check_upload(images, labels, ANNOUNCED, 10)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem


def cohort_reply(client_ids, params, node=1):
    batch = ClientBatch(np.asarray(client_ids), np.full(len(client_ids), 20), params,
                        {"loss-before": np.ones(len(client_ids))})
    return Message(encode_batch(batch), dst_node_id=node, message_type="train")


def test_data_union_trains_on_the_good_uploads_and_names_the_bad():
    calls = []

    def trainer(images, labels, owners, rnd):
        calls.append((images.copy(), labels.copy(), owners.copy()))
        return {"w": np.ones(2)}, {"inspect": [3]}

    strategy = DataUnion(UploadTrainer(trainer, ANNOUNCED, 10))
    strategy.sent = params_to_record({"w": np.zeros(2)})
    good = [cohort_reply([c], {"images": upload(fill=c)[0][None], "labels": upload()[1][None]}) for c in (3, 1)]
    bad_labels = cohort_reply([4], {"images": upload()[0][None], "labels": (upload()[1] + 20)[None]})
    nan = cohort_reply([5], {"images": upload(fill=np.inf)[0][None], "labels": upload()[1][None]})
    huge = cohort_reply([6], {"images": upload(n=2000)[0][None], "labels": np.zeros((1, 2000), np.int64)})
    missing = Message(encode_batch(ClientBatch(np.array([7]), np.array([20]), {}, {})), dst_node_id=1,
                      message_type="train")
    report = strategy.aggregate_round(1, [*good, bad_labels, nan, huge, missing])
    images, labels, owners = calls[0]
    assert owners.tolist() == [1] * 20 + [3] * 20  # client-id order, whatever the reply order
    assert np.array_equal(images[:20], upload(fill=1)[0]) and len(labels) == 40
    assert report.counts["rejected_uploads"] == 3 and report.clients == 2
    text = "\n".join(report.dropped)
    assert "client 4: labels out of range" in text and "client 5: 1280 non-finite" in text
    assert "client 6: upload of 2000 images is larger than the 20 announced" in text
    assert "missing or unreadable upload: 'arrays'" in text
    assert report.defense.flags == {"inspect": [3]} and report.defense.participants == [1, 3]
    assert report.arrays is not None


def test_data_union_with_only_bad_uploads_keeps_the_model():
    strategy = DataUnion(UploadTrainer(lambda *a: pytest.fail("trained on nothing"), ANNOUNCED, 10))
    strategy.sent = params_to_record({"w": np.zeros(2)})
    bad = cohort_reply([0], {"images": upload(fill=np.nan)[0][None], "labels": upload()[1][None]})
    result = strategy.aggregate_round(1, [bad])
    assert result.arrays is None and result.counts["rejected_uploads"] == 1
    assert np.array_equal(result.models["w"], np.zeros((1, 2)))  # the model sent goes on


def test_detection_rates():
    rates = detection_rates({"a": [0, 5], "b": []}, [0, 1, 2, 3, 4, 5], np.array([0, 9]))
    assert rates == {"tpr_a": 1.0, "fpr_a": 0.2, "tpr_b": 0.0, "fpr_b": 0.0}
    assert detection_rates({"a": [2]}, [1, 2], np.array([], np.int64)) == {"tpr_a": None, "fpr_a": 0.5}


# ---- Flower's robust aggregators on cohort replies ------------------------------------------

def weights_round(strategy, models, counts=None):
    reference = {"w": np.zeros(3, np.float32)}
    strategy.sent = params_to_record(reference)
    ids = list(range(len(models)))
    batch = ClientBatch(np.array(ids), np.array(counts or [10] * len(ids)), {"w": np.array(models, np.float32)},
                        {"loss-before": np.ones(len(ids))})
    result = strategy.aggregate_round(1, [Message(encode_batch(batch), dst_node_id=1, message_type="train")])
    return result.arrays["w"].numpy(), result


NODES = dict(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)


def test_fedmedian_is_the_coordinate_median_over_clients_of_a_cohort():
    models = [[0, 0, 0], [1, 2, 3], [2, 4, 6], [100, 100, 100]]
    out, _ = weights_round(CohortFedMedian(**NODES), models)
    assert np.allclose(out, np.median(models, axis=0))


def test_krum_flags_the_outlier_and_clipping_bounds_it():
    rng = np.random.default_rng(0)
    models = (rng.normal(size=(6, 3)) * 0.1).tolist() + [[50.0, 50.0, 50.0]]
    out, report = weights_round(CohortKrum(num_malicious_nodes=1, **NODES), models)
    assert 6 in report.defense.flags["krum"] and len(report.defense.flags["krum"]) == 6  # Krum keeps one update
    assert np.abs(out).max() < 1
    out, report = weights_round(CohortFedAvgClip(clipping_norm=1.0, **NODES), models)
    assert report.defense.flags["clipping"] == [6]
    assert np.abs(out).max() < 1.0 / 7 + 0.1  # the outlier moved the mean by at most norm / n


# ---- through Flower ---------------------------------------------------------------------

TINY = ["federation.clients=4", "backdoor.ipc=2", "backdoor.iterations_per_round=1", "backdoor.outer=3",
        "backdoor.inner=2", "run.rounds=2", "backdoor.server_epochs=40", "backdoor.portion=0.5"]


@pytest.mark.slow
def test_flower_run_records_attack_and_defenses_every_round_and_matches_in_process(ray_cluster, tmp_path):
    """Synthetic uploads through Flower: every round records CTA, ASR, each defense's flags
    with its rates, Neural Cleanse and fine-pruning; the final model is the one the same
    workload code trains in one process, bit for bit."""
    from server.record import load_history
    from server.run_config import client_view
    from simulations.launcher import simulate
    from simulations.scenarios import load_scenario
    from workloads.backdoor import BackdoorDistillation
    from workloads.backdoor.experiment import distil

    scenario = load_scenario("backdoor-doorping", [*TINY, "backdoor.compare_clean=false"])
    history = load_history(simulate(scenario, out=tmp_path, ray_address=ray_cluster))
    assert list(history["strategies"]) == ["data-union/doorping"]
    rows = history["strategies"]["data-union/doorping"]
    assert len(rows) == 3
    for row in rows[1:]:
        assert {"cta", "asr", "asr_all", "nc_anomaly", "nc_flagged_class", "cta_fine_pruning",
                "asr_fine_pruning"} <= set(row)
        assert set(row["flagged"]) == {"spectral", "activation-clustering", "range-check"}
        assert row["rejected_uploads"] == 0 and row["clients"] == 4 and row["examples"] == 80
        assert row["tpr_spectral"] in (0.0, 1.0) and row["fpr_spectral"] in (0.0, 1 / 3, 2 / 3, 1.0)
    wl = BackdoorDistillation(client_view(scenario))
    uploads = distil(wl, [0, 1, 2, 3], "doorping", rounds=2)
    params, flags = wl.server_train(*uploads.union(), 2)
    wl.observe_probes([{"client-id": np.array([0]), "trigger": uploads.trigger}])
    expected = wl.central_metrics({n: v[None] for n, v in params.items()})
    final = history["strategies"]["data-union/doorping"][-1]
    assert final["cta"] == expected["cta"] and final["asr"] == expected["asr"]
    assert final["nc_anomaly"] == expected["nc_anomaly"]
    assert final["flagged"] == flags


@pytest.mark.slow
def test_flower_run_of_weight_uploads_with_krum_flags_clients(ray_cluster, tmp_path):
    from server.record import load_history
    from simulations.launcher import simulate
    from simulations.scenarios import load_scenario

    scenario = load_scenario("backdoor-naive", [*TINY, "run.rounds=1", "backdoor.upload=weights",
                                                "run.strategies=['krum']", "backdoor.compare_clean=false",
                                                "backdoor.defenses=[]", "train.local_steps=5"])
    history = load_history(simulate(scenario, out=tmp_path, ray_address=ray_cluster))
    row = history["strategies"]["krum/naive"][-1]
    assert len(row["flagged"]["krum"]) == 3  # Krum keeps one of four updates
    assert row["tpr_krum"] in (0.0, 1.0) and row["fpr_krum"] in (2 / 3, 1.0)
    assert "asr" in row and "nc_anomaly" not in row


def test_bad_backdoor_scenarios_name_the_field():
    from server.run_config import ScenarioError
    from simulations.scenarios import load_scenario

    cases = [
        (["backdoor.malicious=[12]"], "backdoor.malicious", "client 12 does not exist"),
        (["backdoor.upload=weights"], "run.strategies", "'data-union' trains on uploaded data, but the clients"),
        (["backdoor.target=10"], "backdoor.target", "not a digit class"),
        (["backdoor.trigger_size=7"], "backdoor.trigger_size", "must be in 1..6"),
        (["backdoor.defenses=['strip']"], "backdoor.defenses", "unknown defense 'strip'"),
        (["robust.trim_beta=0.5"], "robust.trim_beta", "must be in [0, 0.5)"),
    ]
    for overrides, field, message in cases:
        with pytest.raises(ScenarioError) as err:
            load_scenario("backdoor-doorping", overrides)
        assert field in str(err.value) and message in str(err.value), str(err.value)


# ---- outcomes (fixed seeds; margins from benchmarks/backdoor.py and its pilots) -------------

def federation_outcome(seed: int) -> dict[str, dict[str, float]]:
    """CTA and ASR of the server's model on the union after one DC iteration of the
    backdoor-doorping federation, for the clean arm and both attacks."""
    from simulations.scenarios import load_scenario
    from workloads.backdoor import BackdoorDistillation
    from workloads.backdoor.experiment import arms, with_attack

    scenario = load_scenario("backdoor-doorping", ["backdoor.iterations_per_round=1", "backdoor.defenses=[]"],
                             seed=seed)
    uploads = arms(scenario, 1)
    out = {}
    for arm, up in uploads.items():
        wl = BackdoorDistillation(with_attack(scenario, "naive" if arm == "naive" else "doorping"))
        params, _ = wl.server_train(*up.union(), 1)
        wl.trigger = (up.trigger if up.trigger is not None else uploads["doorping"].trigger) * wl.mask
        metrics = wl.central_metrics({n: v[None] for n, v in params.items()})
        out[arm] = {"cta": metrics["cta"], "asr": metrics["asr"]}
    return out


@pytest.mark.slow
def test_clean_federation_is_accurate_with_asr_at_chance_and_attacks_keep_cta():
    """Pilot (seeds 0-2, 12 iterations): clean CTA 0.88, ASR 0.00-0.06 under the DOORPING
    trigger; DOORPING's CTA within +-0.03 of clean, NAIVE's within -0.03. After one DC
    iteration here (synthetic sets start from real images): the same picture."""
    from conftest import on_both_cores

    for seed, out in zip((0, 1), on_both_cores([(federation_outcome, 0), (federation_outcome, 1)])):
        clean = out["clean"]
        assert clean["cta"] >= 0.6 and clean["asr"] <= 0.1, (seed, out)
        for attack in ("naive", "doorping"):
            assert out[attack]["cta"] >= clean["cta"] - 0.1, (seed, out)


def one_distiller_outcome(seed: int, arm: str) -> dict[str, float]:
    """The paper's setting (one distiller, 2% poisoned, ipc 10, 20 DC iterations): the mean
    of three victims trained on the arm's synthetic set, scored with the arm's trigger (the
    clean arm's ASR is not read)."""
    from simulations.scenarios import load_scenario
    from workloads.backdoor import BackdoorDistillation
    from workloads.backdoor.experiment import ONE_DISTILLER, distil, victims, with_attack

    scenario = load_scenario("backdoor-doorping", list(ONE_DISTILLER), seed=seed)
    wl = BackdoorDistillation(with_attack(scenario, "doorping" if arm == "clean" else arm))
    uploads = distil(wl, [0], arm, 1)
    trigger = uploads.trigger if uploads.trigger is not None else wl.mask * 0
    return victims(wl, *uploads.union()[:2], trigger)


@pytest.mark.slow
def test_one_distiller_doorping_plants_its_backdoor_where_naive_does_not():
    """The paper's claim in its own setting, on one seed (the suite's time; the benchmark
    runs seeds 0-2: DOORPING ASR 1.00 on every seed, NAIVEATTACK 0.05-0.07, DOORPING's CTA
    0.02-0.08 below clean's)."""
    from conftest import on_both_cores

    jobs = [(seed, arm) for seed in (0,) for arm in ("doorping", "naive", "clean")]
    results = on_both_cores([(one_distiller_outcome, seed, arm) for seed, arm in jobs])
    for seed in (0,):
        out = {arm: r for (s, arm), r in zip(jobs, results) if s == seed}
        assert out["doorping"]["asr"] >= 0.9, (seed, out)
        assert out["naive"]["asr"] < 0.2, (seed, out)
        assert out["doorping"]["cta"] >= out["clean"]["cta"] - 0.1, (seed, out)
        assert out["naive"]["cta"] >= out["clean"]["cta"] - 0.1, (seed, out)
