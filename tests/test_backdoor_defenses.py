"""The server-side backdoor defenses: detectors on planted features, Neural Cleanse and
fine-pruning on a small ConvNet trained with and without a patch backdoor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workloads.backdoor import data, model
from workloads.backdoor.defenses import (
    activation_clustering,
    clip_to_range,
    fine_prune,
    neural_cleanse,
    out_of_range,
    spectral_signatures,
)
from workloads.torch_train import get_params

torch.set_num_threads(1)

OWNERS, PER_CLASS, DIM, ATTACKER = 10, 5, 64, 9
SEEDS = range(8)


def features(seed: int, shift: float, poisoned: int = 5):
    """Per class a Gaussian blob (unit noise around a random mean), PER_CLASS images per
    class from each owner; the attacker adds ``poisoned`` class-0 images moved by a vector
    of norm ``shift``. Returns features, labels, owners and which images are poisoned."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (data.NUM_CLASSES, DIM))
    labels = np.tile(np.repeat(np.arange(data.NUM_CLASSES), PER_CLASS), OWNERS)
    owners = np.repeat(np.arange(OWNERS), data.NUM_CLASSES * PER_CLASS)
    feats = means[labels] + rng.normal(0, 1, (len(labels), DIM))
    truth = np.zeros(len(labels), bool)
    if shift:
        v = rng.normal(size=DIM)
        bad = means[0] + rng.normal(0, 1, (poisoned, DIM)) + shift * v / np.linalg.norm(v)
        feats = np.concatenate([feats, bad])
        labels = np.concatenate([labels, np.zeros(poisoned, np.int64)])
        owners = np.concatenate([owners, np.full(poisoned, ATTACKER)])
        truth = np.concatenate([truth, np.ones(poisoned, bool)])
    return feats.astype(np.float32), labels, owners, truth


DETECTORS = {
    "spectral": lambda f, y, o, seed: spectral_signatures(f, y, o),
    "clustering": lambda f, y, o, seed: activation_clustering(f, y, o, seed=seed),
}


def test_range_check_flags_only_the_client_beyond_the_margin():
    """Bounds (-1, 2): width 3, margin 0.5 allows pixels in [-2.5, 3.5]."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 2, (30, 1, 8, 8)).astype(np.float32)
    owners = np.repeat([0, 1, 2], 10)
    images[3, 0, 6, 6] = 3.4  # client 0: inside the margin, like honest distilled images
    images[15, 0, 5, 5] = 40.0  # client 1: one image far above the range
    images[27, 0, 0, 0] = -2.6  # client 2: just below the margin
    flags = out_of_range(images, owners, (-1.0, 2.0), margin=0.5)
    assert flags.clients == (1, 2)
    assert np.flatnonzero(flags.images).tolist() == [15, 27]
    assert flags.detail["owner_max_excess"][1] == pytest.approx(38 / 3)
    assert out_of_range(images, owners, (-1.0, 2.0), margin=13.0).clients == ()
    clipped = clip_to_range(images, (-1.0, 2.0))
    assert clipped.dtype == images.dtype and clipped.min() == -1.0 and clipped.max() == 2.0
    inside = (images >= -1) & (images <= 2)
    assert np.array_equal(clipped[inside], images[inside])
    with pytest.raises(ValueError, match="one owner per image"):
        out_of_range(images, owners[:5], (-1.0, 2.0), margin=0.5)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_flags_the_client_with_shifted_features(name):
    detect = DETECTORS[name]
    caught, honest_flagged, tp, fp, negatives = 0, 0, 0, 0, 0
    for seed in SEEDS:
        f, y, o, truth = features(seed, shift=10.0)
        flags = detect(f, y, o, seed)
        assert flags.images.shape == truth.shape and flags.images.dtype == bool
        assert list(flags.clients) == sorted(flags.clients)
        json.dumps(flags.detail)  # JSON-ready
        caught += ATTACKER in flags.clients
        honest_flagged += len(set(flags.clients) - {ATTACKER})
        tp += int((flags.images & truth).sum())
        fp += int((flags.images & ~truth).sum())
        negatives += int((~truth).sum())
    assert caught == len(SEEDS)  # client-level TPR 1
    assert honest_flagged <= 1  # over all runs
    assert tp / (5 * len(SEEDS)) >= 0.9  # image-level TPR
    assert fp / negatives <= 0.02  # image-level FPR


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_is_quiet_on_gaussian_features(name):
    detect = DETECTORS[name]
    for seed in SEEDS:
        f, y, o, _ = features(seed, shift=0.0)
        flags = detect(f, y, o, seed)
        assert len(flags.clients) <= 1, (seed, flags.clients)
        assert flags.images.mean() <= 0.02


def test_detector_knobs_and_determinism():
    f, y, o, truth = features(0, shift=10.0)
    # Same seed, same answer.
    a, b = activation_clustering(f, y, o, seed=3), activation_clustering(f, y, o, seed=3)
    assert a.clients == b.clients and np.array_equal(a.images, b.images)
    # The owner threshold is over all of an owner's images: the attacker has 5 of 55 flagged.
    assert ATTACKER not in spectral_signatures(f, y, o, owner_fraction=0.2).clients
    # A poisoned "cluster" that is no minority of its class is not taken for poison.
    f2, y2, o2, _ = features(0, shift=10.0, poisoned=40)
    assert not activation_clustering(f2, y2, o2, seed=0, max_share=0.35).images.any()
    with pytest.raises(ValueError):
        spectral_signatures(f, y[:-1], o)


POISON_SHARE, TRAIN, EPOCHS, LR = 0.2, 300, 200, 0.1


@pytest.fixture(scope="module")
def trained():
    """ConvNetMini trained on 300 digits, once clean and once with 20% of the images
    stamped with a white 2x2 patch and relabelled to 0 (same seed, same schedule)."""
    d = data.load(0, 497)
    mask = data.patch_mask(2)
    trigger = mask * d.high
    x, y = d.x_train[:TRAIN], d.y_train[:TRAIN]
    poison = np.random.default_rng(0).choice(TRAIN, int(POISON_SHARE * TRAIN), replace=False)
    xb, yb = x.copy(), y.copy()
    xb[poison] = data.stamp(x[poison], mask, trigger)
    yb[poison] = 0
    backdoored = model.train_full_batch(model.fresh(0), xb, yb, epochs=EPOCHS, lr=LR)
    clean = model.train_full_batch(model.fresh(0), x, y, epochs=EPOCHS, lr=LR)
    return {
        "data": d,
        "triggered_test": data.stamp(d.x_test, mask, trigger),
        "backdoored": get_params(backdoored),
        "clean": get_params(clean),
    }


def asr(params, t) -> float:
    return model.attack_success(model.from_parameters(params), t["triggered_test"], t["data"].y_test, 0)


def test_neural_cleanse_singles_out_the_target_class(trained):
    d = trained["data"]
    # Preconditions: the backdoor took, and the clean model has none.
    assert asr(trained["backdoored"], trained) > 0.8
    assert asr(trained["clean"], trained) < 0.1
    x_clean = d.x_test[:50]
    bad = neural_cleanse(trained["backdoored"], x_clean, seed=0)
    good = neural_cleanse(trained["clean"], x_clean, seed=0)
    assert len(bad.norms) == len(bad.anomaly) == len(bad.attack_success) == data.NUM_CLASSES
    assert int(np.argmin(bad.norms)) == 0
    assert bad.anomaly[0] > max(good.anomaly)
    assert bad.flagged_class == 0 and good.flagged_class is None
    assert bad.attack_success[0] >= 0.9  # the reversed trigger does flip images to 0


def test_neural_cleanse_is_deterministic_and_leaves_params_alone(trained):
    params = trained["backdoored"]
    before = {k: v.copy() for k, v in params.items()}
    x = trained["data"].x_test[:10]
    a, b = neural_cleanse(params, x, seed=1, steps=5), neural_cleanse(params, x, seed=1, steps=5)
    assert a == b
    assert neural_cleanse(params, x, seed=2, steps=5).norms != a.norms
    assert all(np.array_equal(before[k], params[k]) for k in params)


def test_fine_prune_zeroes_pruned_units_and_keeps_accuracy(trained):
    d = trained["data"]
    x_clean, y_clean = d.x_test[:200], d.y_test[:200]
    repaired, info = fine_prune(trained["backdoored"], x_clean, y_clean, seed=0)
    json.dumps(info)
    pruned = info["pruned_units"]
    assert 0 < len(pruned) == info["num_pruned"] <= 32  # prune_fraction 0.5 of 64 units
    assert np.all(repaired["hidden.weight"][pruned] == 0)
    assert np.all(repaired["hidden.bias"][pruned] == 0)
    assert np.all(repaired["out.weight"][:, pruned] == 0)
    kept = np.setdiff1d(np.arange(info["units"]), pruned)
    assert np.all(np.abs(repaired["hidden.weight"][kept]).sum(1) > 0)
    assert info["accuracy_after"] >= info["accuracy_before"] - 0.1
    # Also on images the repair never saw.
    x_new, y_new = d.x_test[200:], d.y_test[200:]
    before = model.accuracy(model.from_parameters(trained["backdoored"]), x_new, y_new)
    after = model.accuracy(model.from_parameters(repaired), x_new, y_new)
    assert after >= before - 0.1


def test_fine_prune_stops_before_the_accuracy_drop(trained):
    d = trained["data"]
    x_clean, y_clean = d.x_test[:200], d.y_test[:200]
    _, info = fine_prune(trained["backdoored"], x_clean, y_clean, seed=0, prune_fraction=1.0,
                         max_accuracy_drop=0.05, finetune_epochs=0)
    assert info["stopped_by"] == "accuracy" and info["num_pruned"] < info["units"]
    assert info["accuracy_before"] - info["accuracy_pruned"] <= 0.05
    assert info["accuracy_after"] == pytest.approx(info["accuracy_pruned"])
