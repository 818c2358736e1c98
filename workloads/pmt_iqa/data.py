"""An offline image-quality set: crops of the photos bundled with scikit-image and
scikit-learn, six distortions at five levels, a full-reference proxy score.

- **Sources** (``SOURCES``): 20 grey photos in 19 *source groups* (the stereo motorcycle's
  two views are one group). Each source gives ``crops`` random ``size`` x ``size`` crops
  (near-flat crops, sd < 0.04, are redrawn). Groups fall into 5 fixed cross-validation
  folds (``FOLD_OF``, by source image as LIVE and CSIQ are split); a run holds one fold out.
- **Distortions** (``DISTORTIONS``, the spec's LIVE/TID-style list): additive Gaussian
  noise, Gaussian blur, JPEG (Pillow), contrast reduction, grey-level quantisation and
  pixelation. Level L in 1..5 has a strength; with ``continuous`` the strength is drawn
  uniformly between level L-1's and L's (level 0: ``LEVELS[t][0]``, milder than level 1),
  as LIVE varies its parameters per image, so the level is a band and not a value.
- **Proxy score** in 0..100 (``PROXIES``) plus rater noise, clipped: ``ssim``
  (100 SSIM(reference, distorted), the spec's recommended proxy), ``psnr`` (a logistic of
  PSNR, 100 / (1 + exp(-(PSNR - 25) / 4))) or ``mixed`` (their mean). SSIM normalises
  each window by its own contrast, so a slight change to a flat crop scores low though it
  is invisible without the reference; PSNR scores what is visible in absolute terms.
- **Families** (``FAMILY_OF``): the distortions fall into two families, ``artifact``
  (noise, JPEG, quantisation: something added) and ``detail`` (blur, contrast,
  pixelation: something lost). A client sees mostly one family (the hidden group).
- Quality level for PMT's classification head: ``min(9, floor(score / 10))``, global bins.

The set depends on its settings and ``data_seed`` only (never the federation seed), so
every seed of a benchmark sees the same patches and folds.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from workloads import streams

# (source group, loader name): skimage.data functions, "moto-left/right", "china"/"flower" (sklearn)
SOURCES: tuple[tuple[int, str], ...] = (
    (0, "astronaut"), (1, "brick"), (2, "camera"), (3, "chelsea"), (4, "clock"), (5, "coffee"), (6, "coins"),
    (7, "grass"), (8, "gravel"), (9, "hubble_deep_field"), (10, "immunohistochemistry"), (11, "moon"),
    (12, "page"), (13, "retina"), (14, "rocket"), (15, "text"), (16, "moto-left"), (16, "moto-right"),
    (17, "china"), (18, "flower"),
)
GROUPS = 19
FOLDS = 5
# fixed folds of the source groups (textures, photos and documents spread over folds)
FOLD_OF = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3])

DISTORTIONS = ("noise", "saltpepper", "jpeg", "quantise", "pixelate", "blur", "contrast")
FAMILIES = ("noise", "coding", "detail")
FAMILY_OF = np.array([0, 0, 1, 1, 1, 2, 2])  # per distortion
SPEC_DISTORTIONS = ("noise", "blur", "jpeg", "contrast", "quantise", "pixelate")
# the fair set: every distortion's strength can be read off the distorted patch
FAIR_DISTORTIONS = ("noise", "saltpepper", "jpeg", "quantise", "pixelate")
# strength at levels 0..5 (level 0 only bounds level 1's band)
LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.01, 0.02, 0.05, 0.1, 0.15, 0.25),  # sd
    "saltpepper": (0.002, 0.005, 0.01, 0.03, 0.06, 0.12),  # share of pixels set to 0 or 1
    "blur": (0.3, 0.5, 1.0, 1.5, 2.5, 4.0),  # Gaussian sigma, pixels
    "jpeg": (80, 60, 35, 20, 10, 5),  # quality
    "contrast": (0.9, 0.8, 0.6, 0.4, 0.25, 0.12),  # factor around the mean
    "quantise": (32, 24, 12, 8, 5, 3),  # grey levels
    "pixelate": (1.5, 2, 3, 4, 6, 8),  # block side, pixels
}
PROXIES = ("ssim", "psnr", "mixed")
QUALITY_LEVELS = 10


@dataclass(frozen=True, kw_only=True)
class IQASettings:
    size: int = 48
    crops: int = 8
    continuous: bool = True
    proxy: str = "psnr"
    rater_noise: float = 2.0
    distortions: tuple[str, ...] = FAIR_DISTORTIONS
    data_seed: int = 0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "IQASettings":
        return cls(size=int(options["patch_size"]), crops=int(options["crops_per_source"]),
                   continuous=bool(options["continuous_levels"]), proxy=str(options["proxy"]),
                   rater_noise=float(options["rater_noise"]), distortions=tuple(options["distortions"]),
                   data_seed=int(options["data_seed"]))


@dataclass(frozen=True, kw_only=True)
class IQASet:
    """Every distorted patch of the set, in one order (the same on every machine)."""

    patches: np.ndarray  # (N, 1, s, s) float32 in [0, 1]
    scores: np.ndarray  # (N,) float32 in [0, 100]
    distortion: np.ndarray  # (N,) int index into DISTORTIONS
    level: np.ndarray  # (N,) int 1..5
    reference: np.ndarray  # (N,) int: which reference crop
    group: np.ndarray  # (N,) int source group

    @property
    def fold(self) -> np.ndarray:
        return FOLD_OF[self.group]

    @property
    def family(self) -> np.ndarray:
        return FAMILY_OF[self.distortion]


def quality_level(scores: np.ndarray) -> np.ndarray:
    """PMT's class of a score in 0..100: ``min(9, floor(score / 10))`` (global, fixed bins)."""
    return np.minimum(QUALITY_LEVELS - 1, np.floor(np.asarray(scores, np.float64) / 10.0)).astype(np.int64)


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.2125, 0.7154, 0.0721])
    image = image.astype(np.float64)
    return image / 255.0 if image.max() > 1.0 else image


@lru_cache(maxsize=None)
def source_image(name: str) -> np.ndarray:
    """One bundled photo in grey, floats in [0, 1] (both packages ship them: no download)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return _grey(load_sample_image(f"{name}.jpg"))
    from skimage import data

    if name.startswith("moto-"):
        left, right, _ = data.stereo_motorcycle()
        return _grey(left if name == "moto-left" else right)
    return _grey(getattr(data, name)())


def _crops(image: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    h, w = image.shape
    for _ in range(50 * count):
        if len(out) == count:
            break
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = image[y:y + size, x:x + size]
        if crop.std() >= 0.04:  # near-flat crops carry no visible distortion
            out.append(crop)
    if len(out) < count:
        raise ValueError(f"found only {len(out)} non-flat {size}x{size} crops")
    return out


def _jpeg(x: np.ndarray, quality: float) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(x * 255).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=int(round(quality)))
    buf.seek(0)
    return np.asarray(Image.open(buf), np.float64) / 255.0


def _pixelate(x: np.ndarray, block: float) -> np.ndarray:
    from skimage.transform import resize

    small = max(1, int(round(x.shape[0] / block)))
    down = resize(x, (small, small), order=1, anti_aliasing=True)
    return resize(down, x.shape, order=0, anti_aliasing=False)


def _salt_pepper(x: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(x.shape) < share
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float64), x)


def distort(x: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` (grey, [0, 1]) with one distortion at ``strength`` (the units of ``LEVELS``)."""
    from skimage.filters import gaussian

    ops: dict[str, Callable[[], np.ndarray]] = {
        "noise": lambda: x + rng.normal(0.0, strength, x.shape),
        "saltpepper": lambda: _salt_pepper(x, strength, rng),
        "blur": lambda: gaussian(x, sigma=strength, mode="reflect"),
        "jpeg": lambda: _jpeg(x, strength),
        "contrast": lambda: x.mean() + strength * (x - x.mean()),
        "quantise": lambda: np.round(x * (round(strength) - 1)) / (round(strength) - 1),
        "pixelate": lambda: _pixelate(x, strength),
    }
    if kind not in ops:
        raise ValueError(f"unknown distortion {kind!r}; expected one of {list(ops)}")
    return np.clip(ops[kind](), 0.0, 1.0)


def proxy_score(reference: np.ndarray, distorted: np.ndarray, proxy: str) -> float:
    """The full-reference score in 0..100 (before rater noise)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; expected one of {list(PROXIES)}")
    ssim = 100.0 * structural_similarity(reference, distorted, data_range=1.0)
    if proxy == "ssim":
        return ssim
    mse = float(np.mean((reference - distorted) ** 2))
    psnr = peak_signal_noise_ratio(reference, distorted, data_range=1.0) if mse > 0 else 60.0
    logistic = 100.0 / (1.0 + math.exp(-(min(psnr, 60.0) - 25.0) / 4.0))
    return logistic if proxy == "psnr" else 0.5 * (ssim + logistic)


def strength(kind: str, level: int, u: float, continuous: bool) -> float:
    """Level ``level``'s strength: its value, or (continuous) a point ``u`` of its band."""
    values = LEVELS[kind]
    return values[level] if not continuous else values[level - 1] + u * (values[level] - values[level - 1])


@lru_cache(maxsize=4)
def build_set(settings: IQASettings) -> IQASet:
    """Every source's crops x every distortion x every level (20 x crops x 30 patches)."""
    rng = np.random.default_rng(np.random.SeedSequence([settings.data_seed, streams.IQA_DATA]))
    patches, scores, kinds, levels, refs, groups = [], [], [], [], [], []
    ref = 0
    for group, name in SOURCES:
        for crop in _crops(source_image(name), settings.crops, settings.size, rng):
            for kind in settings.distortions:
                t = DISTORTIONS.index(kind)
                for level in range(1, 6):
                    d = distort(crop, kind, strength(kind, level, float(rng.random()), settings.continuous), rng)
                    s = proxy_score(crop, d, settings.proxy) + settings.rater_noise * float(rng.normal())
                    patches.append(d.astype(np.float32))
                    scores.append(min(100.0, max(0.0, s)))
                    kinds.append(t)
                    levels.append(level)
                    refs.append(ref)
                    groups.append(group)
            ref += 1
    # [:, None] alone leaves the channel axis a stride of 0 (1 after fancy indexing), which torch's
    # convolutions read as channels-last: the same patches trained differently in memory and
    # memory-mapped from disk (a Flower node's cohort). Copied, the strides are the canonical ones.
    return IQASet(patches=np.stack(patches)[:, None].copy(), scores=np.array(scores, np.float32),
                  distortion=np.array(kinds, np.int64), level=np.array(levels, np.int64),
                  reference=np.array(refs, np.int64), group=np.array(groups, np.int64))


def level_scorer(data: IQASet, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The per-distortion-level reference: each test patch gets the mean training score of its
    (distortion, level). It is told the distortion and level, which a blind model is not."""
    table = np.zeros((len(DISTORTIONS), 6))
    for t in range(len(DISTORTIONS)):
        for level in range(1, 6):
            cell = train[(data.distortion[train] == t) & (data.level[train] == level)]
            table[t, level] = data.scores[cell].mean() if len(cell) else data.scores[train].mean()
    return table[data.distortion[test], data.level[test]]


def split_clients(family: np.ndarray, train: np.ndarray, clients: int, families: int, share: float,
                  seed: int) -> list[np.ndarray]:
    """Each client's rows among the training patches (``train``: a mask over the set; ``family``:
    each patch's family index). Client c is of family c mod ``families``; a patch goes to a
    client of its family with probability ``share``, else to a client of another family
    (uniformly among them); with one family, to any client."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams.IQA_SPLIT]))
    rows = np.flatnonzero(train)
    of_client = np.arange(clients) % families
    home = rng.random(len(rows)) < share
    pick = rng.random(len(rows))
    owner = np.empty(len(rows), np.int64)
    for f in np.unique(family[rows]):
        for at_home in (True, False):
            at = (family[rows] == f) & ((home | (families == 1)) == at_home)
            pool = np.flatnonzero((of_client == f) == at_home)
            pool = pool if len(pool) else np.arange(clients)
            owner[at] = pool[(pick[at] * len(pool)).astype(np.int64)]
    return [rows[owner == c] for c in range(clients)]
