"""SSTAM on compressed video: the codecs, the detectors by hand, the temporal model's labels,
the workload through the scenario's constructor (clients, arms, settings, device files,
metrics, the report's tables and figure), and one loopback deployment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.run_config import ScenarioError, client_view
from simulations.scenarios import load_scenario
from workloads.base import TrainSettings, stack_params
from workloads.device_files import DeviceDataError
from workloads.sstam import ARM, ARMS, SSTAMVideo, directions, split_contents, ssim_logit
from workloads.sstam import detectors, temporal, video
from workloads.sstam.data import FEATURES

torch.set_num_threads(1)

# 8 contents (two folds of four kinds' worth), a 2-content detector-training set, a short
# temporal training: the set builds in about half a minute, once per machine (disk cache)
TINY = ["sstam.contents=8", "sstam.detector_contents=2", "sstam.temporal_steps=60", "sstam.baselines=[]",
        "federation.clients=4", "run.rounds=3", "train.local_steps=5", "run.strategies=['fedavg']"]


def tiny(overrides=(), seed=0):
    """The scenario's workload, built by the constructor the scenario uses (the ``sstam``
    table's keywords, checked by the schema)."""
    scenario = load_scenario("sstam-video", [*TINY, *overrides], seed=seed)
    return scenario, SSTAMVideo(client_view(scenario))


# ---- real compressed video -----------------------------------------------------------------


def test_every_ladder_decodes_every_frame_and_loses_quality_level_by_level():
    content = video.contents(3, seed=0)[2]  # textured shapes moving over a still texture
    source = video.render(content)
    assert source.shape == (video.FRAMES, video.HEIGHT, video.WIDTH, 3) and source.dtype == np.uint8
    reference = video.to_yuv(source)
    assert reference[0].shape == (video.FRAMES, video.HEIGHT, video.WIDTH)
    assert reference[1].shape == (video.FRAMES, video.HEIGHT // 2, video.WIDTH // 2)
    for ladder, (_, levels) in video.LADDERS.items():
        ssim, sizes = [], []
        for level in levels:
            (y, _, _), size = video.encode(source, ladder, level)
            ssim.append(video.proxy(reference[0], y)[0])
            sizes.append(size)
        # sizes: the MPEG program stream pads to 2 KiB packs, so two small streams can tie
        assert np.all(np.diff(ssim) < 0) and np.all(np.diff(sizes) <= 0) and sizes[0] > sizes[-1], (ladder, ssim, sizes)
    with pytest.raises(ValueError, match="unknown ladder 'vp9'"):
        video.encode(source, "vp9", 30)


def test_the_same_content_renders_and_encodes_to_the_same_bytes():
    content = video.contents(2, seed=5)[1]
    a, b = video.render(content), video.render(content)
    assert np.array_equal(a, b)
    assert np.array_equal(video.encode(a, "mpeg2", 16)[0][0], video.encode(b, "mpeg2", 16)[0][0])
    assert video.contents(2, seed=5) != video.contents(2, seed=6)


def test_an_encode_is_the_same_bytes_every_time_and_whatever_cpus_the_process_may_use():
    """x264 sizes its thread pool by the CPUs it may use and its bitstream follows, and its
    macroblock tree gave grainy content a new stream on every call: on one thread without
    it, a process bound to one CPU (as a Ray worker or a small device may be) decodes the
    same video as this one, and this one the same video twice."""
    import hashlib
    import subprocess
    import sys

    script = ("import os, hashlib; os.sched_setaffinity(0, {0}); from workloads.sstam import video as v; "
              "c = v.contents(5, seed=0)[4]; (y, _, _), n = v.encode(v.render(c), 'h264', 28); "
              "print(hashlib.sha1(y.tobytes()).hexdigest(), n)")
    bound = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grain = video.render(video.contents(5, seed=0)[4])  # the film-grain kind
    (y, _, _), size = video.encode(grain, "h264", 28)
    assert bound == [hashlib.sha1(y.tobytes()).hexdigest(), str(size)]
    assert np.array_equal(video.encode(grain, "h264", 28)[0][0], y)


# ---- the detectors, by hand -----------------------------------------------------------------


def _smooth(t=3, h=32, w=32, seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random((t, h, w)), (0, 2, 2)).astype(np.float32)


def _value(maps):
    return float(detectors.pool(maps, np.ones_like(maps[0])))


def test_blocking_sees_steps_on_the_8px_grid_and_not_off_it():
    y = _smooth()
    steps = np.repeat(np.repeat(np.random.default_rng(1).random((3, 4, 4)) * 0.1, 8, 1), 8, 2).astype(np.float32)
    shifted = np.roll(steps, 4, axis=(1, 2))  # the same steps, 4 px off the grid
    assert _value(detectors.blocking(y + steps)) > 2 * _value(detectors.blocking(y + shifted))
    assert _value(detectors.blocking(y + steps)) > 2 * _value(detectors.blocking(y))


def test_blur_rises_and_sharpness_falls_when_a_frame_is_blurred_and_block_steps_do_not_count_as_detail():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    y = rng.random((2, 32, 32)).astype(np.float32)
    blurred = ndimage.gaussian_filter(y, (0, 1.5, 1.5))
    assert _value(detectors.blur(blurred)) > 2 * _value(detectors.blur(y))
    assert _value(detectors.sharpness(blurred)) < 0.5 * _value(detectors.sharpness(y))
    flat_blocks = np.repeat(np.repeat(rng.random((2, 4, 4)), 8, 1), 8, 2).astype(np.float32)
    assert _value(detectors.sharpness(flat_blocks)) == pytest.approx(0.0, abs=1e-9)  # steps only on the grid


def test_flicker_counts_block_mean_jumps_in_still_blocks_and_floating_texture_changes():
    still = np.repeat(_smooth(1), 4, axis=0)
    assert _value(detectors.flicker(still)) == pytest.approx(0.0, abs=1e-9)
    jumps = still + np.array([0, 0.004, 0, 0.004], np.float32)[:, None, None]  # below the static threshold
    assert _value(detectors.flicker(jumps)) == pytest.approx(0.004, rel=1e-3)
    texture = (0.05 * (-1.0) ** np.add.outer(np.arange(32), np.arange(32))).astype(np.float32)  # pixel-fine
    assert _value(detectors.floating(still + texture)) == pytest.approx(0.0, abs=1e-6)
    moving = still + np.stack([np.roll(texture, t, axis=1) for t in range(4)])  # flips while the low-pass stays
    assert _value(detectors.floating(moving)) > 0.5


def test_saliency_weights_sum_to_one_a_frame_and_follow_motion():
    y = np.repeat(_smooth(1, 64, 64), 3, axis=0)
    y[1:, 40:56, 8:24] += 0.3  # something appears in the left half of frames 1 and 2
    s = detectors.saliency(y)
    assert s.shape == (3, 8, 8) and np.allclose(s.sum(axis=(1, 2)), 1.0)
    assert s[1, 5:7, 1:3].mean() > 2 * s[1, 5:7, 5:7].mean()


# ---- the temporal model's labels and tokens ---------------------------------------------------


def test_the_generator_labels_flicker_from_block_mean_jumps_and_floating_only_where_the_source_is_still():
    rng = np.random.default_rng(0)
    source = np.repeat(rng.random((1, 1, 32, 32)), temporal.CLIP, axis=1).astype(np.float32)
    moving = np.stack([np.roll(source[0, 0], t, axis=1) for t in range(temporal.CLIP)])[None]
    refs = np.concatenate([source, source, moving])
    jump = np.where(np.arange(temporal.CLIP) % 2, 0.02, 0.0)[None, :, None, None].astype(np.float32)
    decoded = np.concatenate([source, source + jump, moving])
    flick, floats = temporal.intensities(refs, decoded)
    assert flick[0] == 0 and flick[1] == pytest.approx(0.02) and flick[2] == 0
    assert floats[0] == 0 and not np.isnan(floats[1]) and np.isnan(floats[2])
    tokens = temporal.TinyTimeSformer.tokens(torch.from_numpy(decoded))
    assert tokens.shape == (3, temporal.CLIP, 16, 2 * 64)
    assert torch.all(tokens[:, 0, :, 64:] == 0)  # no change before the first frame


# ---- the workload, through the scenario's constructor -----------------------------------------


def test_clients_hold_whole_contents_of_one_codec_and_the_test_fold_is_nobodys():
    content = np.repeat(np.arange(8), 4)
    codec = np.tile([0, 0, 1, 1], 8)
    train = content % 4 != 0
    rows = split_contents(content, codec, train, 4)
    assert sorted(np.concatenate(rows).tolist()) == np.flatnonzero(train).tolist()
    for c, r in enumerate(rows):
        assert len(r) and set(codec[r]) == {c % 2}
    assert not set(content[rows[0]]) & set(content[rows[2]])  # the two H.264 services own different contents
    scenario, wl = tiny()
    data = wl.client_data(np.arange(4))
    assert wl.true_clusters(data).tolist() == [0, 1, 0, 1] and wl.num_clusters == 2
    part = wl.subset(data, np.array([1, 3]))
    assert part.client_ids.tolist() == [1, 3] and part.groups.tolist() == [1, 1]
    assert np.array_equal(part.ssim[:data.num_examples[1]], data.ssim[data.starts[1]:data.starts[2]])
    pooled = SSTAMVideo(client_view(load_scenario("sstam-video", [*TINY, "federation.clients=1",
                                                                  "sstam.pool_clients=4", "anchors.count=0"])))
    whole = pooled.client_data(np.array([0]))
    assert np.array_equal(np.sort(whole.ssim), np.sort(data.ssim)) and whole.groups is None
    base = SSTAMVideo.baselines(load_scenario("sstam-video", [*TINY, "sstam.baselines=['centralised']"]))
    assert base["centralised"]["sstam"]["pool_clients"] == 4


@pytest.mark.parametrize("overrides, field, message", [
    (["sstam.arms=['sstam', 'vmaf']"], "sstam.arms", "unknown arm 'vmaf'"),
    (["sstam.contents=6"], "sstam.contents", ">= 8"),
    (["sstam.fold=4"], "sstam.fold", "4"),
    (["sstam.pool_clients=2"], "sstam.pool_clients", "federation.clients is 4"),
    (["federation.clients=1", "anchors.count=0"], "federation.clients", "cannot hold the 2 codecs"),
    (["federation.clients=14"], "federation.clients", "leave some without a content"),
    (["anchors.count=1", "run.strategies=['clustered-fedavg']"], "anchors.count", "cannot cover the 2 codecs"),
])
def test_bad_settings_name_the_field(overrides, field, message):
    with pytest.raises(ScenarioError, match=rf"{field}: .*{message}"):
        load_scenario("sstam-video", [*TINY, *overrides])


def test_each_arm_reads_its_own_features_and_marks_its_model():
    _, wl = tiny()
    data = wl.subset(wl.client_data(np.arange(4)), np.array([0]))
    start = stack_params(wl.initial_parameters(), 1)
    x = {arm: wl.inputs(np.asarray(data.features), arm).numpy() for arm in ARMS}
    assert x["sstam"].shape == (data.num_examples[0], 9)
    assert np.array_equal(x["sstam"][:, :5], x["classical-temporal"][:, :5])  # same saliency-weighted spatial
    assert not np.allclose(x["sstam"][:, 5:7], x["classical-temporal"][:, 5:7])  # model against classical
    assert not np.allclose(x["sstam"], x["no-saliency"])
    raw = np.array(data.features[:1])
    raw[0, 0, FEATURES.index("blocking")] = 1e6  # far beyond anything the detector-training set saw
    assert wl.inputs(raw, "sstam")[0, 0] == 3.0  # clipped at 3 sd: one row cannot steer the fit
    _, mlp = tiny(["sstam.hidden=4", "sstam.optimizer='adam'"])
    assert sorted(mlp.initial_parameters()) == [ARM, "net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    for arm in ARMS:
        out = wl.local_train(start, data, TrainSettings(local_steps=2, lr=0.01, server_round=1, variant=arm))
        assert out[ARM][0].tolist() == np.eye(len(ARMS))[ARMS.index(arm)].tolist()
    with pytest.raises(ValueError, match="unknown SSTAM arm 'x'"):
        wl.local_train(start, data, TrainSettings(local_steps=1, lr=0.01, variant="x"))


def test_training_ranks_unseen_contents_within_and_across_ladders():
    """Seed 0, fold 1, the pooled client, 100 SGD steps of the SSTAM arm against the untrained
    model. Pilot (tiny set, folds 0-3, 100 and 300 steps, every arm): pooled SRCC 0.63-0.94
    from -0.68-0.09, within-ladder 0.24-1.0 (fold 0 is the weak one); fold 1 at 100 steps:
    0.91 pooled and 1.00 within, from -0.44 and -0.77."""
    _, wl = tiny(["federation.clients=1", "sstam.pool_clients=4", "anchors.count=0", "sstam.fold=1"])
    start = stack_params(wl.initial_parameters(), 1)
    before = wl.central_metrics(start)
    trained = wl.local_train(start, wl.client_data(np.array([0])),
                             TrainSettings(local_steps=100, lr=0.05, server_round=1, variant="sstam"))
    after = wl.central_metrics(trained)
    assert after["srcc"] > before["srcc"] + 0.5, (before, after)
    assert after["srcc_within"] >= 0.9 and after["srcc_within"] > before["srcc_within"] + 0.5, (before, after)


def test_the_data_tables_hold_the_gated_detector_directions_and_the_temporal_models_auc():
    """The issue's gates on the tiny set (8 contents): blocking's mean rho with compression
    >= 0.9 and deblocking off blockier than on in every pair; blur and sharpness >= 0.85.
    The tiny temporal model (60 steps, 2 contents) beats the classical flicker detector
    (pilot: AUC 0.88 against 0.78); on floating it is only asked to rank (0.90 against 0.89)."""
    _, wl = tiny()
    m = wl.data_metrics
    assert m["direction_blocking"] >= 0.9 and m["direction_blur"] >= 0.85 and m["direction_sharpness"] >= 0.85, m
    assert np.mean(directions(wl.dataset, detectors.DETECTORS.index("blocking"), 1)) == 1.0  # deblocking off
    tables = wl.data_tables()
    assert [t["header"][0] if t["header"] else "" for t in tables] == ["detector", "", "artifact"]
    assert "in 48 of 48 pairs" in tables[1]["title"]  # deblocking off is blockier, every content and CRF
    assert m["auc_flicker_model"] > m["auc_flicker_classical"] + 0.05, m  # pilot: 0.88 against 0.78
    assert m["auc_floating_model"] > 0.6, m


def test_device_files_read_back_as_the_simulated_clients_without_codecs_and_bad_ones_are_named(tmp_path):
    _, wl = tiny()
    data = wl.client_data(np.arange(2))
    paths = []
    for cid, arrays in wl.device_files(data):
        assert sorted(arrays) == ["client_id", "features", "ssim"]
        paths.append(tmp_path / f"client-{cid}.npz")
        np.savez(paths[-1], **arrays)
    back = wl.read_device_files(paths)
    for field in ("client_ids", "features", "ssim", "starts"):
        assert np.array_equal(getattr(back, field), getattr(data, field)), field
    assert back.groups is None and wl.true_clusters(back) is None
    arrays = dict(np.load(paths[0]))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**arrays, "ssim": arrays["ssim"] * 0})
    with pytest.raises(DeviceDataError, match=rf"{bad}: 'ssim' must lie in \(0, 1\]"):
        wl.read_device_files([bad])
    np.savez(bad, **{**arrays, "features": arrays["features"][:, :, :5]})
    with pytest.raises(DeviceDataError, match=rf"expected \(n, 2, {len(FEATURES)}\)"):
        wl.read_device_files([bad])


def test_central_metrics_pick_a_model_per_codec_and_the_report_draws_the_tables_and_the_maps(tmp_path):
    from simulations.report import plot_artifact_maps, summary_table

    _, wl = tiny()
    models = stack_params(wl.initial_parameters(), 1)
    m = wl.central_metrics(models)
    assert {"srcc", "plcc", "srcc_within", "srcc_h264", "srcc_mpeg2"} == set(m)
    two = {n: np.stack([v[0], v[0]]) for n, v in models.items()}
    d, rows = wl.dataset, wl.test_rows
    two["net.0.weight"][:] = 0.0  # constant predictions: the output bias (the default regressor is linear)
    for g in range(2):
        target = ssim_logit(d.ssim[rows][d.codec[rows] == g]).mean()
        two["net.0.bias"][:, 0] = [target, -50.0]
        assert np.allclose(wl.test_predictions(two)[d.codec[rows] == g], target)
    final = wl.final_report(models)
    assert len(final["artifact_maps"]["maps"]) == 2 + len(detectors.DETECTORS)
    history = {"name": "t", "workload": "sstam_video", "seed": 0, "status": "finished", "key_metric": "srcc",
               "strategies": {a: [{"round": 0, "srcc": 0.1}, {"round": 1, "srcc": 0.5, "final": final}]
                              for a in ("x", "y")}}
    assert plot_artifact_maps(history, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 1000
    text = summary_table(history)
    assert text.count("### Detector directions") == 1 and "| blocking |" in text and "| flicker |" in text


def test_the_set_is_read_back_from_the_disk_cache_unchanged(tmp_path, monkeypatch):
    from workloads.sstam import data

    _, wl = tiny()
    built = wl.dataset
    path = data.cache_path(wl.settings)
    assert path.exists()
    data.build_set.cache_clear()
    again = data.build_set(wl.settings)
    assert np.array_equal(again.features, built.features) and again.content_names == built.content_names
    assert data.cache_path(wl.settings) != data.cache_path(data.SSTAMSettings(contents=12))


def test_a_device_measures_its_own_encode_into_the_sets_features_with_the_stored_temporal_model():
    """The real device path: a service renders (here: regenerates) a source, encodes it,
    decodes it and measures it with the set's stored temporal model; the features are the
    set's row for that encode, so a device's file means what the simulation's does."""
    from workloads.sstam.data import measure

    _, wl = tiny()
    d = wl.dataset
    row = int(np.flatnonzero((d.content == 1) & (d.ladder == 2) & (d.level == 1))[0])
    content = video.contents(wl.settings.contents, wl.settings.data_seed)[1]
    ladder = list(video.LADDERS)[2]
    (y, u, v), _ = video.encode(video.render(content), ladder, video.LADDERS[ladder][1][1])
    np.testing.assert_allclose(measure(y, u, v, d.temporal_model()), d.features[row], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_umbel_deploy_run_carries_sstam_to_devices_and_matches_the_simulation(tmp_path):
    """Two devices (one per codec), two rounds of the SSTAM arm under FedAvg: each device
    trains on the features and SSIM of its file (no codec in it); the models and the
    evaluator's scores are the in-process simulation's."""
    from server.record import load_history
    from deployment_support import deploy_with_the_cli, matches_the_simulation, no_labels_no_drops

    overrides = [*TINY, "federation.clients=2", "federation.cohort_size=1", "run.round_timeout=120.0",
                 "sstam.arms=['sstam']", "run.rounds=2"]
    run_dir = deploy_with_the_cli(tmp_path, "sstam-video", overrides, ["sv-0", "sv-1"])
    assert all(sorted(np.load(f).files) == ["client_id", "features", "ssim"]
               for f in (tmp_path / "data").glob("client-*.npz"))
    history = load_history(run_dir)
    assert history["status"] == "finished"
    rows = history["strategies"]["fedavg/sstam"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    no_labels_no_drops(rows, clients=2)
    matches_the_simulation(run_dir, load_scenario("sstam-video", overrides), "fedavg", rows, ("srcc", "plcc"),
                           variant="sstam", atol=1e-6)
