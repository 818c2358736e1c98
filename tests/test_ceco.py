"""CeCo segmentation: the fixed simplex ETF (unit columns, cosine -1/(K-1), the same on every
client, never in the averaged model), the regulariser (each present class once), inference
without the branch, the regulariser's loss and the centres' distance to the ETF falling in
training (against plain cross-entropy), the scenes and their imbalance, the metrics, scenario
errors, device files, the report's segmentation figure, and one loopback deployment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.run_config import ScenarioError, client_view
from simulations.scenarios import load_scenario
from workloads.base import TrainSettings, stack_params
from workloads.ceco import ARMS, CeCoSegmentation
from workloads.ceco.data import TAIL, SceneSettings, client_scenes, pixel_frequencies, held_out_scenes
from workloads.ceco.model import (
    UNet, branch_names, ceco_loss, class_weights, confusion, etf_closeness, etf_distance, iou, simplex_etf,
)
from workloads.device_files import DeviceDataError

torch.set_num_threads(1)

TINY = ["federation.clients=2", "ceco.images_per_client=24", "ceco.test_per_group=8", "ceco.image_size=16",
        "ceco.widths=[4, 8]", "ceco.head_dim=8", "ceco.pick_images=4", "ceco.preview=2", "ceco.baselines=[]",
        "ceco.imbalance='mild'", "anchors.count=2", "run.rounds=2", "train.local_steps=2", "run.strategies=['fedavg']"]


def tiny(overrides=(), seed=0):
    """The scenario's workload, built by the constructor the scenario uses (the ``ceco``
    table's keywords, checked by the schema)."""
    scenario = load_scenario("ceco-segmentation", [*TINY, *overrides], seed=seed)
    return scenario, CeCoSegmentation(client_view(scenario))


# ---- the fixed simplex ETF --------------------------------------------------------------------


def test_the_etf_has_unit_columns_pairwise_cosine_minus_one_over_k_minus_one_and_comes_from_the_seed():
    _, a = tiny()
    _, b = tiny()  # another client of the same scenario
    m = a.etf
    assert m.shape == (8, 6)
    np.testing.assert_allclose(np.linalg.norm(m, axis=0), 1.0, atol=1e-12)
    cos = m.T @ m
    np.testing.assert_allclose(cos[~np.eye(6, dtype=bool)], -1 / 5, atol=1e-12)
    np.testing.assert_allclose(m.sum(axis=1), 0.0, atol=1e-12)  # the columns sum to zero
    assert np.array_equal(a.etf, b.etf)  # every client derives the same frame
    assert not np.allclose(tiny(seed=1)[1].etf, m)
    with pytest.raises(ValueError, match="dim >= 6"):
        simplex_etf(6, 5, 0)


def test_the_etf_is_never_in_the_model_the_server_averages():
    scenario, wl = tiny()
    params = wl.initial_parameters()
    net = UNet(wl.widths, 6, wl.head_dim)
    assert sorted(params) == sorted(net.state_dict())  # every array the server sees is a network weight
    assert all(v.shape != wl.etf.shape and v.shape != wl.etf.T.shape for v in params.values())
    data = wl.client_data(np.arange(2))
    trained = wl.local_train(stack_params(params, 2), data,
                             TrainSettings(local_steps=2, lr=1e-3, server_round=1, variant="ceco"))
    assert sorted(trained) == sorted(params)  # the reply carries no ETF either
    assert not any(np.allclose(np.asarray(v).ravel()[:48], wl.etf.ravel()) for v in trained.values()
                   if np.asarray(v).size >= 48)
    assert branch_names(params) == ["ceco_head.weight", "ceco_head.bias"]  # the head is averaged like any weight


# ---- the regulariser --------------------------------------------------------------------------


def test_each_present_class_counts_once_whatever_its_pixel_count():
    etf = torch.tensor(simplex_etf(6, 8, 0), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 8, 4, 4, generator=g)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 5  # one pixel of class 5 against fifteen of class 0
    loss = ceco_loss(z, labels, etf, 0.1)
    flat = z[0].reshape(8, -1).T
    by_hand = []
    for k, sel in ((0, labels.ravel() == 0), (5, labels.ravel() == 5)):
        centre = F.normalize(flat[sel].mean(0), dim=0)
        by_hand.append(F.cross_entropy((centre @ etf / 0.1)[None], torch.tensor([k])))
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)  # a plain mean over classes
    # more pixels of the same centre change nothing: the class still counts once
    z2 = torch.cat([z, z], dim=3)
    labels2 = torch.cat([labels, torch.zeros_like(labels)], dim=2)
    z2[..., 4:] = flat[labels.ravel() == 0].mean(0)[:, None, None]  # sixteen more pixels at class 0's centre
    assert ceco_loss(z2, labels2, etf, 0.1).item() == pytest.approx(loss.item(), rel=1e-5)
    # absent classes do not enter: a batch of class 0 alone is its centre's term alone
    only = F.normalize(z[0, :, :1, 1:].reshape(8, -1).mean(1), dim=0)
    assert ceco_loss(z[..., :1, 1:], labels[..., :1, 1:], etf, 0.1).item() == pytest.approx(
        F.cross_entropy((only @ etf / 0.1)[None], torch.tensor([0])).item(), rel=1e-5)


def test_dropping_the_branch_leaves_inference_unchanged():
    _, wl = tiny()
    params = wl.initial_parameters()
    x = torch.from_numpy(wl.client_data(np.array([0])).images[:4])
    full = wl._load(params)
    without = UNet(wl.widths, 6, head_dim=0)
    without.load_state_dict({n: torch.as_tensor(v) for n, v in wl.inference_params(params).items()}, strict=True)
    without.eval()
    with torch.no_grad():
        a = full(x)
        assert torch.equal(a, without(x))
        full.ceco_head.weight.mul_(-3.0)  # a different branch: the same predictions
        assert torch.equal(a, full(x))
    assert sum(p.numel() for p in without.parameters()) == sum(
        p.numel() for n, p in full.named_parameters() if not n.startswith("ceco_head"))


def test_the_regulariser_loss_and_the_centres_distance_to_the_etf_fall_with_ceco_not_with_plain_ce():
    """Seed 0, one tiny client (48 scenes, U-Net 8/8), 120 local steps from the same start
    (lambda 1, temperature 0.5), measured on the client's scenes: CeCo's term and the branch
    centres' distance to their ETF columns (1 - cos) fall; plain cross-entropy never trains
    the branch, so that distance stays near where it started. Pilot: CeCo term 2.15 -> 0.79
    (CE 1.84), distance 1.00 -> 0.30 (CE 0.93)."""
    _, wl = tiny(["federation.clients=1", "ceco.images_per_client=48", "ceco.lambda=1.0", "ceco.temperature=0.5",
                  "ceco.widths=[8, 8]"])
    data = wl.client_data(np.array([0]))
    start = stack_params(wl.initial_parameters(), 1)

    def geometry(models):
        return wl.centre_geometry({n: v[0] for n, v in models.items()}, data.images, data.masks)

    before = geometry(start)
    after = {arm: geometry(wl.local_train(start, data, TrainSettings(local_steps=120, lr=3e-3, server_round=1,
                                                                      variant=arm)))
             for arm in ("ceco", "ce")}
    print(before, after)
    assert after["ceco"]["ceco_loss"] < 0.5 * before["ceco_loss"]
    assert after["ceco"]["ceco_loss"] < after["ce"]["ceco_loss"] - 0.5
    assert after["ceco"]["etf_distance"] < before["etf_distance"] - 0.4
    assert after["ceco"]["etf_distance"] < after["ce"]["etf_distance"] - 0.4
    assert abs(after["ce"]["etf_distance"] - before["etf_distance"]) < 0.15  # the features move, the head not


def test_weighted_ce_weights_the_rare_classes_up_and_the_arm_reaches_local_training():
    w = class_weights(np.array([0] * 90 + [1] * 9 + [2]), 6, 0.5)
    assert w[2] > w[1] > w[0]
    counts = np.array([90, 9, 1, 0, 0, 0]) + 1.0
    assert float((counts / counts.sum() * w.numpy()).sum()) == pytest.approx(1.0, rel=1e-5)
    _, wl = tiny()
    data = wl.client_data(np.array([0]))
    start = stack_params(wl.initial_parameters(), 1)
    out = {arm: wl.local_train(start, data, TrainSettings(local_steps=1, lr=1e-2, server_round=1, variant=arm))
           for arm in ARMS}
    assert np.array_equal(out["ce"]["ceco_head.weight"], start["ceco_head.weight"])  # only CeCo trains the head
    assert not np.array_equal(out["ceco"]["ceco_head.weight"], start["ceco_head.weight"])
    assert not np.array_equal(out["weighted-ce"]["classifier.weight"], out["ce"]["classifier.weight"])
    with pytest.raises(ValueError, match="unknown CeCo arm 'focal'"):
        wl.local_train(start, data, TrainSettings(local_steps=1, lr=1e-2, variant="focal"))
    from client.app import _settings
    from flwr.app import ConfigRecord
    assert _settings(ConfigRecord({"local-steps": 1, "lr": 0.1, "variant": "ceco"})).variant == "ceco"


# ---- scenes -----------------------------------------------------------------------------------


def test_scenes_are_seeded_imbalanced_toward_the_tail_and_differ_by_scene_type():
    s = SceneSettings(images_per_client=150)
    a, b = client_scenes(s, 0, 0), client_scenes(s, 0, 0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (150, 1, 32, 32) and a[0].dtype == np.float32
    freq = pixel_frequencies(np.concatenate([client_scenes(s, 0, c)[1] for c in range(4)]))
    assert freq[1] > freq[2] > freq[3] > max(freq[list(TAIL)])  # presence and size fall with the class
    assert freq[1] / freq[5] > 50  # the severe imbalance: about 100:1 between disk and ring
    type0, type1 = (pixel_frequencies(np.concatenate([client_scenes(s, 0, c)[1] for c in (g, g + 2)]))
                    for g in (0, 1))
    assert type0[5] > 3 * type1[5] and type1[4] > 3 * type0[4]  # rings in type 0, diamonds in type 1
    mild = pixel_frequencies(np.concatenate([client_scenes(SceneSettings(imbalance="mild"), 0, c)[1]
                                             for c in range(4)]))
    assert mild[1] / mild[5] < 10
    day, night = (client_scenes(SceneSettings(inverted_type1=True), 0, c) for c in (0, 1))
    for (x, m), shapes_brighter in ((day, True), (night, False)):  # type 1 in inverted contrast
        assert (x[:, 0][m > 0].mean() > x[:, 0][m == 0].mean()) == shapes_brighter
    test = pixel_frequencies(np.concatenate([m for _, m in held_out_scenes(SceneSettings(test_per_group=60), 0)]))
    assert test[1:].max() / test[1:].min() < 6  # class-balanced presence (the rare shapes stay smaller)


def test_iou_and_etf_closeness_by_hand():
    conf = confusion(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 3)
    assert conf.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    ious = iou(conf)
    assert ious[0] == pytest.approx(1 / 3) and ious[1] == pytest.approx(2 / 4) and np.isnan(ious[2])
    m = simplex_etf(6, 8, 3).T
    assert etf_closeness(m * np.arange(1, 7)[:, None] * 0 + m + 5.0) == pytest.approx(0.0, abs=1e-9)  # shifted
    assert etf_closeness(np.eye(6)) == pytest.approx(0.0, abs=1e-9)  # centred one-hots are a simplex
    collapsed = np.eye(6)
    collapsed[5] = collapsed[4]  # minority collapse: two classes on one centre
    assert etf_closeness(collapsed) > 0.1
    assert etf_distance(m, m.T) == pytest.approx(0.0, abs=1e-12)


# ---- scenario and federation ------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field, message", [
    (["ceco.arms=['ce', 'focal']"], "ceco.arms", "unknown arm 'focal'"),
    (["ceco.head_dim=5"], "ceco.head_dim", "below the 6 classes"),
    (["ceco.image_size=18", "ceco.widths=[4, 8, 8]"], "ceco.image_size", "not a multiple of 4"),
    (["ceco.pool_clients=2"], "ceco.pool_clients", "federation.clients is 2"),
    (["anchors.count=1", "run.strategies=['clustered-fedavg']"], "anchors.count", "cannot cover 2 scene types"),
    (["federation.clients=1", "anchors.count=0", "run.strategies=['ifca']"], "federation.clients",
     "cannot hold 2 scene types"),
    (["ceco.scene_groups=3"], "ceco.scene_groups", "3"),
])
def test_bad_settings_name_the_field(overrides, field, message):
    with pytest.raises(ScenarioError, match=rf"{field}: .*{message}"):
        load_scenario("ceco-segmentation", [*TINY, *overrides])


def test_clients_hold_their_scene_type_and_the_centralised_client_pools_them():
    scenario, wl = tiny(["federation.clients=4", "ceco.baselines=['centralised']"])
    data = wl.client_data(np.arange(4))
    assert wl.true_clusters(data).tolist() == [0, 1, 0, 1]
    assert wl.variants() == ("ce", "weighted-ce", "ceco")
    part = wl.subset(data, np.array([1, 3]))
    assert part.client_ids.tolist() == [1, 3] and part.groups.tolist() == [1, 1]
    assert np.array_equal(part.images[:24], data.images[24:48])
    base = CeCoSegmentation.baselines(scenario)["centralised"]
    assert base["ceco"]["pool_clients"] == 4 and base["train"]["local_steps"] == 4 * 2
    pooled = CeCoSegmentation(client_view(load_scenario("ceco-segmentation", [
        *TINY, "federation.clients=1", "ceco.pool_clients=4", "anchors.count=0", "run.strategies=['fedavg']"])))
    whole = pooled.client_data(np.array([0]))
    assert np.array_equal(whole.images, data.images) and whole.groups is None


def test_device_files_read_back_as_the_simulated_clients_without_scene_types_and_bad_ones_are_named(tmp_path):
    _, wl = tiny()
    data = wl.client_data(np.arange(2))
    paths = []
    for cid, arrays in wl.device_files(data):
        assert sorted(arrays) == ["client_id", "images", "masks"]
        paths.append(tmp_path / f"client-{cid}.npz")
        np.savez(paths[-1], **arrays)
    back = wl.read_device_files(paths)
    for field in ("client_ids", "images", "masks", "starts"):
        assert np.array_equal(getattr(back, field), getattr(data, field)), field
    assert back.groups is None and wl.true_clusters(back) is None
    arrays = dict(np.load(paths[0]))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**arrays, "masks": arrays["masks"] + 6})
    with pytest.raises(DeviceDataError, match=rf"{bad}: 'masks' must be classes 0-5"):
        wl.read_device_files([bad])
    np.savez(bad, **{**arrays, "images": arrays["images"][:, :, :8]})
    with pytest.raises(DeviceDataError, match=r"expected \(n, 1, 16, 16\)"):
        wl.read_device_files([bad])


def test_central_metrics_and_the_segmentation_figure(tmp_path):
    from simulations.report import plot_label_maps

    _, wl = tiny()
    models = stack_params(wl.initial_parameters(), 1)
    m = wl.central_metrics(models)
    assert {"miou", "tail_iou", "iou_ring", "etf_closeness", "etf_distance", "miou_scene0"} <= set(m)
    assert m["tail_iou"] == pytest.approx((m["iou_diamond"] + m["iou_ring"]) / 2)
    two = {n: np.stack([v[0], v[0]]) for n, v in models.items()}  # a k-model pair: the second says background
    two["classifier.bias"][1] = [8.0, 0, 0, 0, 0, 0]
    assert wl._pick(two, 0) == 1 and wl._pick(two, 1) == 1  # the least cross-entropy (most pixels are ground)
    final = wl.final_report(models)["label_maps"]
    assert len(final["input"]) == len(final["prediction"]) == 2 and len(final["truth"][0]) == 16
    history = {"name": "t", "strategies": {a: [{"round": 1, "final": {"label_maps": final}}] for a in ("x", "y")}}
    assert plot_label_maps(history, tmp_path / "s.png") and (tmp_path / "s.png").stat().st_size > 1000


# ---- deployment -------------------------------------------------------------------------------


@pytest.mark.slow
def test_umbel_deploy_run_carries_ceco_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices (two scene types), a round of the CeCo arm under FedAvg: each device
    trains on its own scenes from its file (no scene type in it) with the ETF it derives
    from the seed; the models and the evaluator's scores are the in-process simulation's."""
    from server.record import load_history
    from deployment_support import deploy_with_the_cli, matches_the_simulation, no_labels_no_drops

    overrides = [*TINY, "federation.cohort_size=1", "run.round_timeout=120.0", "run.strategies=['fedavg']",
                 "ceco.arms=['ceco']", "run.rounds=1"]
    run_dir = deploy_with_the_cli(tmp_path, "ceco-segmentation", overrides, ["cc-0", "cc-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "images", "masks"]
               for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    rows = history["strategies"]["fedavg/ceco"]
    assert [r["round"] for r in rows] == [0, 1]
    no_labels_no_drops(rows, clients=2)
    deployed = matches_the_simulation(run_dir, load_scenario("ceco-segmentation", overrides), "fedavg", rows,
                                      ("miou", "tail_iou", "etf_closeness", "etf_distance"), variant="ceco",
                                      atol=1e-6)
    assert not np.allclose(deployed["ceco_head.weight"], CeCoSegmentation(
        client_view(load_scenario("ceco-segmentation", overrides))).initial_parameters()["ceco_head.weight"])
