"""The SSTAM set: every encode of every content, measured once (``build_set``).

For each content (``video.contents``) and each ladder level (``video.LADDERS``) the video is
encoded and decoded; the proxy (luma SSIM, PSNR) compares it with its source, and the
no-reference measurement makes its features, twice: pooled under the saliency weights and
under equal weights (``FEATURES``):

- the seven classical detectors (``detectors.DETECTORS``),
- the temporal model's mean flicker and floating probability over the video's clips,
- two context features a no-reference metric can see: the mean gradient (how much detail
  the content has) and the mean frame difference (how much it moves).

The temporal model is trained first, on a separate *detector-training* set of contents
(other seeds, ``detector_contents`` of them), whose features also fix the features' scale
(``feature_mean``, ``feature_sd``): nothing about the evaluated contents leaks into either.
Its clip-level labels and scores on the evaluated contents are kept for the AUC table.

Building takes about two minutes on one core at the defaults; the result is cached on disk
(``$UMBEL_CACHE``, default ``~/.cache/umbel``) under a hash of the settings and of
``VERSION``, so every process of a run (server, Ray workers) and every later run reads it.
Bump ``VERSION`` when a change here would change the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from workloads.sstam import detectors, temporal, video

VERSION = 4
TEMPORAL_FEATURES = ("flicker_model", "floating_model")
CONTEXT = ("activity", "motion")
FEATURES = detectors.DETECTORS + TEMPORAL_FEATURES + CONTEXT
# features read through a log (ratios and energies spanning decades)
LOG_FEATURES = ("blocking", "sharpness", "ringing", "bleeding", "flicker", "floating", "activity", "motion")
LOG_FLOOR = 1e-4
FOLDS = 4
FIGURE = ("static-disc", "h264-nodeblock", 38, 12)  # kind, ladder, level, frame of the artifact-map figure


@dataclass(frozen=True, kw_only=True)
class SSTAMSettings:
    contents: int = 16
    detector_contents: int = 8
    temporal_steps: int = 400
    data_seed: int = 0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "SSTAMSettings":
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


@dataclass(frozen=True)
class SSTAMSet:
    """One row per encode (``n`` of them); features (n, 2, F): [:, 0] saliency-weighted,
    [:, 1] equal weights; raw (before the log and the scale)."""

    features: np.ndarray
    ssim: np.ndarray
    psnr: np.ndarray
    size: np.ndarray  # bytes of the stream
    content: np.ndarray
    ladder: np.ndarray  # index into video.LADDERS
    level: np.ndarray  # position in its ladder (0: least compressed)
    feature_mean: np.ndarray  # (F,) of the transformed features on the detector-training set
    feature_sd: np.ndarray
    clip_video: np.ndarray  # clip-level rows: which encode
    clip_labels: np.ndarray  # (m, 2) the generator's flicker / floating labels (NaN: undefined)
    clip_model: np.ndarray  # (m, 2) the temporal model's probabilities
    clip_classical: np.ndarray  # (m, 2) the classical detectors
    figure: np.ndarray  # (2 + len(DETECTORS), bh', bw') a frame, its saliency map, each detector's map
    temporal_weights: np.ndarray  # the temporal model's parameters, flattened (``temporal_model``)
    content_names: tuple[str, ...] = ()

    @property
    def codec(self) -> np.ndarray:
        return np.array([video.CODEC_OF[name] for name in video.LADDERS])[self.ladder]

    @property
    def fold(self) -> np.ndarray:
        return self.content % FOLDS

    def temporal_model(self) -> temporal.TinyTimeSformer:
        """The trained temporal model: what a device needs, with ``measure``, to compute the
        features of its own encodes."""
        import torch

        model = temporal.TinyTimeSformer()
        torch.nn.utils.vector_to_parameters(torch.from_numpy(self.temporal_weights), model.parameters())
        return model.eval()

    def transformed(self, saliency: bool = True) -> np.ndarray:
        """(n, F) features after the log and the detector-training set's standardisation."""
        return (transform(self.features[:, 0 if saliency else 1]) - self.feature_mean) / self.feature_sd


def transform(raw: np.ndarray) -> np.ndarray:
    out = np.array(raw, np.float64)
    for i, name in enumerate(FEATURES):
        if name in LOG_FEATURES:
            out[..., i] = np.log(np.maximum(out[..., i], 0) + LOG_FLOOR)
    return out


def _context(y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(activity, motion) pooled under block weights (T, bh, bw)."""
    gy, gx = np.gradient(y, axis=(1, 2))
    activity = (detectors.blocks(np.hypot(gx, gy)) / detectors.BLOCK ** 2 * weights).sum() / weights.sum()
    diff = detectors.blocks(np.abs(np.diff(y, axis=0))) / detectors.BLOCK ** 2
    motion = (diff * weights[1:]).sum() / max(weights[1:].sum(), detectors.EPS)
    return np.array([activity, motion])


def measure(y: np.ndarray, u: np.ndarray, v: np.ndarray, model: temporal.TinyTimeSformer | None,
            clip_probs: np.ndarray | None = None) -> np.ndarray:
    """(2, F) raw features of one decoded video: saliency-weighted, then equal weights."""
    maps = detectors.all_maps(y, u, v)
    probs = temporal.predict(model, temporal.clips(y)) if clip_probs is None else clip_probs
    out = []
    for weights in (detectors.saliency(y), np.full((y.shape[0], *maps["blocking"][0].shape[1:]), 1.0)):
        w_clip = temporal.clip_weights(weights)
        model_scores = (probs * w_clip[:, None]).sum(axis=0) / w_clip.sum()
        out.append(np.concatenate([detectors.video_features(maps, weights), model_scores, _context(y, weights)]))
    return np.stack(out)


def _encodes(content: video.Content):
    """(ladder index, level index, decoded planes, bytes, the source's luma, the source's clips)
    of every encode; the source's luma and clips are made once per content."""
    source = video.render(content)
    reference = video.to_yuv(source)[0]
    reference_clips = temporal.clips(reference)
    for li, (ladder, (_, levels)) in enumerate(video.LADDERS.items()):
        for vi, level in enumerate(levels):
            planes, size = video.encode(source, ladder, level)
            yield li, vi, planes, size, reference, reference_clips


def train_temporal(settings: SSTAMSettings) -> tuple[temporal.TinyTimeSformer, tuple[float, float], np.ndarray]:
    """The temporal model, its label thresholds and the detector-training set's raw features."""
    x, flick, floats, raw = [], [], [], []
    for content in video.contents(settings.detector_contents, settings.data_seed + 1):
        for _, _, (y, u, v), _, _, source in _encodes(content):
            decoded = temporal.clips(y)
            f, g = temporal.intensities(source, decoded)
            x.append(np.round(decoded * 255).astype(np.uint8))
            flick.append(f)
            floats.append(g)
            raw.append((y, u, v))
    flick, floats = np.concatenate(flick), np.concatenate(floats)
    thresholds = (float(np.median(flick)), float(np.nanmedian(floats)))
    labels = label(flick, floats, thresholds)
    model = temporal.train(np.concatenate(x), labels, steps=settings.temporal_steps, seed=settings.data_seed)
    features = np.stack([measure(y, u, v, model)[0] for y, u, v in raw])
    return model, thresholds, features


def label(flicker: np.ndarray, floating: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """(n, 2) binary labels: above the threshold; floating NaN where undefined."""
    return np.stack([(flicker > thresholds[0]).astype(np.float64),
                     np.where(np.isnan(floating), np.nan, (floating > thresholds[1]).astype(np.float64))], axis=1)


def compute_set(settings: SSTAMSettings) -> SSTAMSet:
    import torch

    model, thresholds, detector_features = train_temporal(settings)
    reference_features = transform(detector_features)
    rows: dict[str, list] = {k: [] for k in ("features", "ssim", "psnr", "size", "content", "ladder", "level")}
    clip_rows: dict[str, list] = {k: [] for k in ("video", "labels", "model", "classical")}
    figure = None
    names = video.contents(settings.contents, settings.data_seed)
    for ci, content in enumerate(names):
        for li, vi, (y, u, v), size, reference, reference_clips in _encodes(content):
            decoded = temporal.clips(y)
            probs = temporal.predict(model, decoded)
            flick, floats = temporal.intensities(reference_clips, decoded)
            clip_rows["video"].append(np.full(len(decoded), len(rows["ssim"])))
            clip_rows["labels"].append(label(flick, floats, thresholds))
            clip_rows["model"].append(probs)
            clip_rows["classical"].append(temporal.classical_scores(decoded))
            ssim, psnr = video.proxy(reference, y)
            for key, value in (("features", measure(y, u, v, model, probs)), ("ssim", ssim), ("psnr", psnr),
                               ("size", size), ("content", ci), ("ladder", li), ("level", vi)):
                rows[key].append(value)
            ladder = list(video.LADDERS)[li]
            if figure is None and (content.kind, ladder, video.LADDERS[ladder][1][vi]) == FIGURE[:3]:
                figure = figure_maps(y, u, v, FIGURE[3])
    return SSTAMSet(
        features=np.stack(rows["features"]), ssim=np.array(rows["ssim"]), psnr=np.array(rows["psnr"]),
        size=np.array(rows["size"], np.int64), content=np.array(rows["content"], np.int64),
        ladder=np.array(rows["ladder"], np.int64), level=np.array(rows["level"], np.int64),
        feature_mean=reference_features.mean(axis=0), feature_sd=reference_features.std(axis=0) + 1e-9,
        clip_video=np.concatenate(clip_rows["video"]).astype(np.int64), clip_labels=np.concatenate(clip_rows["labels"]),
        clip_model=np.concatenate(clip_rows["model"]), clip_classical=np.concatenate(clip_rows["classical"]),
        figure=np.zeros((0, 0, 0)) if figure is None else figure,
        temporal_weights=torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy(),
        content_names=tuple(c.name for c in names))


def figure_maps(y: np.ndarray, u: np.ndarray, v: np.ndarray, frame: int) -> np.ndarray:
    """A frame's luma (on the block grid: its block means), its saliency and each detector's
    per-block value at that frame, stacked: (2 + len(DETECTORS), bh, bw)."""
    maps = detectors.all_maps(y, u, v)
    out = [detectors.blocks(y[frame:frame + 1])[0] / detectors.BLOCK ** 2, detectors.saliency(y)[frame]]
    for name in detectors.DETECTORS:
        at = frame if name in detectors.SPATIAL else frame - 1  # a temporal map's step into this frame
        a, ca, b, cb = (m[at] for m in maps[name])
        out.append((a / np.maximum(ca, detectors.EPS)) / np.maximum(b / np.maximum(cb, detectors.EPS), detectors.EPS))
    return np.stack(out)


def cache_dir() -> Path:
    return Path(os.environ.get("UMBEL_CACHE") or Path.home() / ".cache" / "umbel")


def cache_path(settings: SSTAMSettings) -> Path:
    key = json.dumps({"version": VERSION, **asdict(settings)}, sort_keys=True)
    return cache_dir() / f"sstam-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _load(path: Path) -> SSTAMSet:
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    names = tuple(str(n) for n in arrays.pop("content_names"))
    return SSTAMSet(**arrays, content_names=names)


@lru_cache(maxsize=4)
def build_set(settings: SSTAMSettings) -> SSTAMSet:
    """The set for ``settings``: read from the disk cache, or computed and written there.
    The first writer wins (a hard link fails when the file exists) and every builder then
    reads the file back, so all processes on a machine share one copy bit for bit, even
    were a build ever to differ between processes."""
    path = cache_path(settings)
    if not path.exists():
        data = compute_set(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **{f.name: np.asarray(getattr(data, f.name)) for f in fields(data)})
        try:
            os.link(tmp.name, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp.name)
    return _load(path)
