"""Server-side backdoor defenses: the server inspects what clients upload, or repairs a model.

- Spectral signatures (Tran et al., NeurIPS 2018): within a class, poisoned images shift the
  penultimate features along one direction, so the top singular vector of the class's centred
  features separates them; an image's outlier score is its squared projection on it.
- Activation clustering (Chen et al., 2018, arXiv:1811.03728): within a class, the features
  of poisoned images form their own cluster; 2-means after a 10-d projection, and a small,
  well-separated cluster is taken as poison.
- Neural Cleanse (Wang et al., IEEE S&P 2019): for every class, the smallest mask (with its
  pattern) that sends clean images to that class; an infected class needs a far smaller mask
  than the others, which a MAD-based anomaly index reveals.
- The range check: a pixel of a real image lies in the data's valid range; an uploaded
  synthetic image far outside it is suspect (reject its client), or every upload is clipped
  into the range (repair). Cheap, and aimed at attacks whose triggers leave the range.
- Fine-pruning (Liu et al., RAID 2018): units of the penultimate layer that stay dormant on
  clean data tend to carry the backdoor; prune them while clean accuracy holds, then
  fine-tune on clean data.

The first three flag images, then the clients (owners) that uploaded many flagged images; the
last two take a model's parameters. All are numpy in, numpy out (torch inside) and
deterministic in their seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from workloads.backdoor.data import NUM_CLASSES
from workloads.backdoor.model import Params, accuracy, from_parameters
from workloads.torch_train import get_params

MAD_SCALE = 1.4826  # makes the MAD a consistent estimate of a Gaussian's standard deviation


@dataclass(frozen=True, eq=False)
class Flags:
    """What a detector flagged: client ids (sorted), a bool per image, and a JSON-ready summary."""

    clients: tuple[int, ...]
    images: np.ndarray
    detail: dict


@dataclass(frozen=True)
class Cleanse:
    """Neural Cleanse's result, one entry per class."""

    norms: tuple[float, ...]  # L1 norm of the reverse-engineered mask
    anomaly: tuple[float, ...]  # (median - norm) / (1.4826 MAD): large means a small outlier
    flagged_class: int | None  # the smallest-norm class when its anomaly index exceeds 2
    attack_success: tuple[float, ...]  # clean non-t images sent to t by the mask and pattern


def _robust_scale(values: np.ndarray) -> float:
    return float(MAD_SCALE * np.median(np.abs(values - np.median(values))))


def _check(features: np.ndarray, labels: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, ...]:
    features = np.asarray(features, np.float64)
    labels, owners = np.asarray(labels).astype(np.int64), np.asarray(owners).astype(np.int64)
    if features.ndim != 2 or labels.shape != (len(features),) or owners.shape != (len(features),):
        raise ValueError(f"need features (N, D), labels (N,), owners (N,); got {features.shape}, "
                         f"{labels.shape}, {owners.shape}")
    return features, labels, owners


def _owners(
    images: np.ndarray, owners: np.ndarray, owner_fraction: float, min_flagged: int,
) -> tuple[tuple[int, ...], dict]:
    """Flag an owner when at least ``owner_fraction`` of all its images are flagged (and at
    least ``min_flagged`` of them, so one odd image of a tiny upload does not condemn it).
    The fraction is over all its images: a poisoner concentrates its flags, an honest
    client's rare false alarms spread thin. Default 0.05, not 0.2: a distilling client
    uploads the same number of images per class, so a poisoned target class is a tenth
    of its upload and 0.2 could never be reached."""
    ids = np.unique(owners)
    rates = [float(images[owners == o].mean()) for o in ids]
    counts = [int(images[owners == o].sum()) for o in ids]
    clients = tuple(int(o) for o, r, k in zip(ids, rates, counts) if r >= owner_fraction and k >= min_flagged)
    return clients, {"owners": [int(o) for o in ids], "owner_flag_rate": rates, "owner_flagged_images": counts}


def _per_class(
    features: np.ndarray, labels: np.ndarray, owners: np.ndarray, columns: tuple[str, ...],
    judge: Callable[[np.ndarray], tuple[np.ndarray, dict[str, Any]] | None],
    *, owner_fraction: float, min_flagged: int, min_class_size: int,
) -> Flags:
    """The frame of the per-class defenses: ``judge(idx)`` sees the images ``idx`` of one
    class (classes under ``min_class_size`` images are skipped) and returns which of them it
    flags and the class's details (``columns``), or None to skip the class. Owners: see
    ``_owners``."""
    features, labels, owners = _check(features, labels, owners)
    images = np.zeros(len(labels), bool)
    per_class: dict[str, list] = {name: [] for name in ("class", "size", *columns)}
    skipped = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        verdict = judge(idx) if len(idx) >= min_class_size else None
        if verdict is None:
            skipped.append(int(c))
            continue
        hit, detail = verdict
        images[idx[hit]] = True
        for name, value in {"class": int(c), "size": len(idx), **detail}.items():
            per_class[name].append(value)
    clients, owner_detail = _owners(images, owners, owner_fraction, min_flagged)
    return Flags(clients, images, {**per_class, "skipped_classes": skipped, **owner_detail})


# Tiny matrices: BLAS threads cost more (10x on a 2-core box) than they save.
@threadpool_limits.wrap(limits=1, user_api="blas")
def spectral_signatures(
    features: np.ndarray, labels: np.ndarray, owners: np.ndarray, *,
    eps: float = 3.0, owner_fraction: float = 0.05, min_flagged: int = 2, min_class_size: int = 5,
) -> Flags:
    """Per class: project the centred features on their top right singular vector; Tran et
    al.'s outlier score is the squared projection. They drop the 1.5 x (poison budget)
    highest scores, which needs the budget and always drops something; instead an image is
    flagged when its projection lies more than ``eps`` robust standard deviations
    (1.4826 x MAD) from the class's median projection. The median and MAD ignore a
    poisoned minority; on Gaussian classes of 50 images the default flags about 0.6% of
    images (0.3% in theory; the top direction is fitted to the class's own extremes).
    Classes with fewer than ``min_class_size`` images are skipped. Owners: see ``_owners``.
    """

    def judge(idx: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        centred = features[idx] - features[idx].mean(0)
        v = np.linalg.svd(centred, full_matrices=False)[2][0]
        proj = centred @ v
        spread = _robust_scale(proj)
        if spread <= 1e-12:  # a degenerate class (e.g. all-dead ReLUs): no direction to trust
            spread = float(proj.std())
        dev = np.abs(proj - np.median(proj))
        hit = dev > eps * spread if spread > 1e-12 else np.zeros(len(idx), bool)
        # The score cutoff that the rule amounts to, on Tran's squared-projection scale
        # (the larger side, as the median need not sit at the mean).
        cutoff = float(max(np.median(proj) + eps * spread, eps * spread - np.median(proj)) ** 2)
        return hit, {"max_score": float((proj ** 2).max()), "cutoff_score": cutoff, "flagged": int(hit.sum())}

    return _per_class(features, labels, owners, ("max_score", "cutoff_score", "flagged"), judge,
                      owner_fraction=owner_fraction, min_flagged=min_flagged, min_class_size=min_class_size)


@threadpool_limits.wrap(limits=1, user_api="blas")
def activation_clustering(
    features: np.ndarray, labels: np.ndarray, owners: np.ndarray, *, seed: int,
    max_share: float = 0.35, min_silhouette: float = 0.20, components: int = 10,
    owner_fraction: float = 0.05, min_flagged: int = 2, min_class_size: int = 5,
) -> Flags:
    """Per class: PCA of the features to at most ``components`` dims (Chen et al. use 10),
    2-means (10 restarts, seeded). The smaller cluster is poison when it holds less than
    ``max_share`` of the class (Chen et al.'s relative-size test; poison is a minority) AND
    its split is real: mean silhouette above ``min_silhouette``. 0.20, not 0.10: 2-means on
    one Gaussian blob of 50 images in 10-d scores up to ~0.14; a planted cluster ~0.4.
    The small cluster's images are flagged.
    Classes with fewer than ``min_class_size`` images are skipped. Owners: see ``_owners``."""

    def judge(idx: np.ndarray) -> tuple[np.ndarray, dict[str, Any]] | None:
        centred = features[idx] - features[idx].mean(0)
        if len(np.unique(centred.round(9), axis=0)) < 2:
            return None
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        k = min(components, len(idx) - 1, features.shape[1])
        reduced = u[:, :k] * s[:k]
        assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(assign, minlength=2)
        if sizes.min() == 0:
            return None
        small = int(sizes.argmin())
        share = float(sizes[small] / len(idx))
        sil = float(silhouette_score(reduced, assign))
        suspicious = share < max_share and sil > min_silhouette
        hit = (assign == small) & suspicious
        return hit, {"share": share, "silhouette": sil, "suspicious": int(suspicious)}

    return _per_class(features, labels, owners, ("share", "silhouette", "suspicious"), judge,
                      owner_fraction=owner_fraction, min_flagged=min_flagged, min_class_size=min_class_size)


def out_of_range(
    images: np.ndarray, owners: np.ndarray, bounds: tuple[float, float], *, margin: float,
) -> Flags:
    """The range check: an uploaded image is flagged when one of its pixels lies more than
    ``margin`` (in units of the valid range's width) outside the data's valid pixel range
    ``bounds``; a client is flagged when any of its images is. Distilled images are not
    clamped (DC moves them freely), so honest uploads leave the range a little: the margin
    is calibrated on honest uploads."""
    images, owners = np.asarray(images), np.asarray(owners).astype(np.int64)
    if len(images) != len(owners):
        raise ValueError(f"need one owner per image; got {len(images)} images and {len(owners)} owners")
    low, high = bounds
    slack = margin * (high - low)
    flat = images.reshape(len(images), -1)
    excess = np.maximum(flat.max(1) - high, low - flat.min(1)) if len(images) else np.zeros(0)
    hit = excess > slack
    clients, detail = _owners(hit, owners, owner_fraction=0.0, min_flagged=1)
    worst = [float(excess[owners == o].max()) / (high - low) for o in detail["owners"]]
    return Flags(clients, hit, {**detail, "owner_max_excess": worst, "margin": margin})


def clip_to_range(images: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """The range repair: every uploaded pixel clipped into the data's valid range."""
    return np.clip(images, *bounds).astype(np.asarray(images).dtype)


def _frozen(params: Params) -> torch.nn.Module:
    model = from_parameters(params).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def neural_cleanse(
    params: Params, x_clean: np.ndarray, *, seed: int, steps: int = 100, lam: float = 0.1,
    lr: float = 0.1, pixel_range: tuple[float, float] | None = None,
) -> Cleanse:
    """Neural-Cleanse-lite: for every target t at once (a batch dimension over the 10
    targets), Adam on a mask m = sigmoid(a) (1x8x8, from about 0.5) and a pattern p (1x8x8,
    from 0) to minimise mean CE(model(x (1 - m) + m p), t) + lam |m|_1 over the clean images.

    A fixed ``lam`` replaces the paper's adaptive schedule. Its default is 0.1, not the
    brief's 0.01: in 100 steps, 0.01 leaves every class's mask at 20-30 of 64 pixels and
    the infected class does not stand out; at 0.1 it does (while every class still
    reaches ~95% flips). The pattern is clipped to ``pixel_range`` after each step, by
    default the range of ``x_clean`` (the paper keeps it a valid image): unconstrained, a
    tiny mask times a huge pattern dodges the L1 penalty for every class. Pass
    ``(-inf, inf)`` for an unconstrained pattern. Returns per-class mask norms, anomaly
    indices (only small-norm outliers count), the flagged class and each mask's flip rate.
    """
    if pixel_range is None:
        pixel_range = (float(np.min(x_clean)), float(np.max(x_clean)))
    model = _frozen(params)
    x = torch.as_tensor(np.asarray(x_clean), dtype=torch.float32)
    n, shape = len(x), tuple(x.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    # Small seeded noise around m = 0.5 breaks the symmetry between pixels.
    a = (0.1 * torch.randn((NUM_CLASSES, *shape), generator=gen)).requires_grad_(True)
    p = torch.zeros((NUM_CLASSES, *shape), requires_grad=True)
    targets = torch.arange(NUM_CLASSES).repeat_interleave(n)
    opt = torch.optim.Adam([a, p], lr=lr)

    def stamped() -> torch.Tensor:
        m = torch.sigmoid(a)
        return (x[None] * (1 - m[:, None]) + (m * p)[:, None]).reshape(NUM_CLASSES * n, *shape)

    for _ in range(steps):
        opt.zero_grad()
        ce = F.cross_entropy(model(stamped()), targets, reduction="none").view(NUM_CLASSES, n).mean(1)
        # Summing the per-target losses keeps the ten optimisations independent.
        (ce + lam * torch.sigmoid(a).flatten(1).sum(1)).sum().backward()
        opt.step()
        with torch.no_grad():
            p.clamp_(*pixel_range)
    with torch.no_grad():
        norms = torch.sigmoid(a).flatten(1).sum(1).numpy().astype(np.float64)
        pred = model(stamped()).argmax(1).view(NUM_CLASSES, n).numpy()
        clean = model(x).argmax(1).numpy()
    # No labels come in: "non-t" images are those the model itself does not call t.
    asr = tuple(float((pred[t][clean != t] == t).mean()) if np.any(clean != t) else 0.0
                for t in range(NUM_CLASSES))
    anomaly = (np.median(norms) - norms) / max(_robust_scale(norms), 1e-12)
    smallest = int(norms.argmin())
    flagged = smallest if anomaly[smallest] > 2.0 else None  # the paper's cutoff
    return Cleanse(tuple(float(v) for v in norms), tuple(float(v) for v in anomaly), flagged, asr)


def fine_prune(
    params: Params, x_clean: np.ndarray, y_clean: np.ndarray, *, seed: int,
    prune_fraction: float = 0.5, max_accuracy_drop: float = 0.05, finetune_epochs: int = 20,
    lr: float = 0.01,
) -> tuple[Params, dict]:
    """Fine-pruning: rank the units of ``hidden`` by mean ReLU activation on ``x_clean``
    (ties among dead units broken by a seeded shuffle) and prune the most dormant ones (zero
    their incoming row and bias in ``hidden`` and their column in ``out``), one more at a
    time, until ``prune_fraction`` of the units are pruned or the clean accuracy on
    (x_clean, y_clean) would fall more than ``max_accuracy_drop`` below the unpruned
    model's (stopping just before). Then ``finetune_epochs`` full-batch SGD epochs
    (momentum 0.9) on the clean data, re-zeroing the pruned units after every step.
    ``seed`` only orders ties (e.g. dead units). Returns the repaired parameters and a
    JSON-ready account."""
    x = torch.as_tensor(np.asarray(x_clean), dtype=torch.float32)
    y = np.asarray(y_clean).astype(np.int64)
    model = _frozen(params)
    with torch.no_grad():
        feats = model.features(x)
        w_out, b_out = model.out.weight, model.out.bias
    units = feats.shape[1]
    order = np.random.default_rng(seed).permutation(units)
    mean_act = feats.mean(0).numpy()
    ranked = order[np.argsort(mean_act[order], kind="stable")]  # most dormant first

    def pruned_accuracy(k: int) -> float:
        # Zeroing a unit's incoming row and bias makes its ReLU output 0: same as masking it.
        keep = torch.ones(units)
        keep[torch.as_tensor(ranked[:k])] = 0.0
        logits = (feats * keep) @ w_out.T + b_out
        return float((logits.argmax(1).numpy() == y).mean())

    base = pruned_accuracy(0)
    limit = int(np.floor(prune_fraction * units))
    k, stopped_by = 0, "fraction"
    while k < limit:
        if base - pruned_accuracy(k + 1) > max_accuracy_drop:
            stopped_by = "accuracy"
            break
        k += 1
    pruned = np.sort(ranked[:k])
    at_prune = pruned_accuracy(k)

    net = from_parameters(params)
    dead = torch.as_tensor(pruned, dtype=torch.int64)

    def rezero() -> None:
        with torch.no_grad():
            net.hidden.weight[dead] = 0.0
            net.hidden.bias[dead] = 0.0
            net.out.weight[:, dead] = 0.0

    rezero()
    yt = torch.as_tensor(y)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(finetune_epochs):  # full batch: nothing random here
        opt.zero_grad()
        F.cross_entropy(net(x), yt).backward()
        opt.step()
        rezero()  # momentum would otherwise revive the pruned units
    net.eval()
    info = {
        "units": units,
        "pruned_units": [int(u) for u in pruned],
        "num_pruned": int(k),
        "stopped_by": stopped_by,
        "accuracy_before": base,
        "accuracy_pruned": at_prune,
        "accuracy_after": accuracy(net, np.asarray(x_clean), y),
    }
    return get_params(net), info
