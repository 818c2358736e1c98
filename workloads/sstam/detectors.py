"""The six perceivable encoding artifacts (PEAs), measured without the reference, and a
low-cost saliency model; numpy over whole videos at once.

Every detector works on the decoded planes (Y in [0, 1], (T, H, W); U, V at half size) and
gives four maps on the 8 x 8 block grid, ``(a, ca, b, cb)``: its value pooled over any
weights w is the ratio of two weighted means, ``(sum w a / sum w ca) / (sum w b / sum w cb)``
(``pool``). A ratio of pooled sums rather than a mean of per-block ratios: blocks with
nothing to measure (no edge, no texture) then weigh nothing instead of dividing by zero.

| detector | ratio | rises with compression? |
| --- | --- | --- |
| ``blocking`` | mean step across 8-px block boundaries / mean step inside blocks | yes |
| ``blur`` | share of the gradient that survives a 9-px re-blur (Crete et al.'s re-blur) | yes |
| ``sharpness`` | mean squared Laplacian (reported as its log) | no: falls |
| ``ringing`` | high-pass energy next to strong edges / high-pass energy in flat areas | expected yes |
| ``bleeding`` | chroma gradient beside luma edges / chroma gradient on them | expected yes |
| ``flicker`` | mean jump of block means between frames, in blocks that look static | expected yes |
| ``floating`` | frame-to-frame change of the high-pass texture / its size, in static textured blocks | expected yes |

The spec's feasibility run found only blocking and blur/sharpness reliably monotone: the
others are measured and reported, and the temporal attention model (``temporal``) is where
flicker and floating are meant to improve.

Saliency (``saliency``): the spectral residual (Hou and Zhang 2007) of a 32 x 40 thumbnail,
a motion map (frame difference) and a centre bias, each normalised and blended, on the block
grid; each frame's weights sum to 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BLOCK = 8
SPATIAL = ("blocking", "blur", "sharpness", "ringing", "bleeding")
TEMPORAL = ("flicker", "floating")
DETECTORS = SPATIAL + TEMPORAL
EDGE = 0.15  # gradient magnitude (luma in [0, 1]) of a strong edge
FLAT = 0.02  # below it a pixel is flat
STATIC = 0.01  # mean |frame difference| of a block that looks static
TEXTURED = 1e-4  # mean squared high-pass of a textured block
EPS = 1e-6


def blocks(x: np.ndarray) -> np.ndarray:
    """Sums over the 8 x 8 blocks of (T, H, W) arrays: (T, H/8, W/8)."""
    t, h, w = x.shape
    return x.reshape(t, h // BLOCK, BLOCK, w // BLOCK, BLOCK).sum(axis=(2, 4))


def _step(y: np.ndarray, axis: int) -> np.ndarray:
    """|y[i+1] - y[i]| along ``axis``, the last position zero (same shape as y)."""
    d = np.abs(np.diff(y, axis=axis))
    pad = [(0, 0)] * y.ndim
    pad[axis] = (0, 1)
    return np.pad(d, pad)


def _gradient(y: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(y, axis=(1, 2))
    return np.hypot(gx, gy)


def _highpass(y: np.ndarray) -> np.ndarray:
    return y - ndimage.gaussian_filter(y, (0, 1.0, 1.0))


Maps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _on_boundary(n: int) -> np.ndarray:
    """Positions i whose step y[i+1] - y[i] crosses a block boundary."""
    i = np.arange(n)
    return (i % BLOCK == BLOCK - 1) & (i < n - 1)


def _near_boundary(n: int) -> np.ndarray:
    """Pixels on either side of a block boundary (where a Laplacian sees the block step)."""
    i = np.arange(n) % BLOCK
    return (i == 0) | (i == BLOCK - 1)


def blocking(y: np.ndarray) -> Maps:
    on_x, on_y = _on_boundary(y.shape[2])[None, None, :], _on_boundary(y.shape[1])[None, :, None]
    dx, dy = _step(y, 2), _step(y, 1)
    ones = np.ones_like(y)
    n_boundary = ones * on_x + ones * on_y
    return (blocks(dx * on_x + dy * on_y), blocks(n_boundary), blocks(dx * ~on_x + dy * ~on_y),
            blocks(2 * ones - n_boundary))


def blur(y: np.ndarray) -> Maps:
    """Steps across block boundaries are left out: they are blocking, not detail, and would
    make a blocky frame look sharp."""
    survived, total = np.zeros_like(y), np.zeros_like(y)
    for axis in (1, 2):
        inside = ~_on_boundary(y.shape[axis])
        inside = inside[None, :, None] if axis == 1 else inside[None, None, :]
        sharp = _step(y, axis) * inside
        reblurred = _step(ndimage.uniform_filter1d(y, 9, axis=axis), axis) * inside
        survived += sharp - np.maximum(0.0, sharp - reblurred)  # what the re-blur leaves of each step
        total += sharp
    ones = blocks(np.ones_like(y))
    return blocks(survived), ones, blocks(total) + EPS, ones


def sharpness(y: np.ndarray) -> Maps:
    """Mean squared Laplacian away from block boundaries (for the same reason as ``blur``)."""
    lap = np.stack([ndimage.laplace(f, mode="nearest") for f in y])
    away = (~_near_boundary(y.shape[1])[:, None] & ~_near_boundary(y.shape[2])[None, :]).astype(y.dtype)
    ones = blocks(np.ones_like(y))
    return blocks(lap ** 2 * away), blocks(np.broadcast_to(away, y.shape).copy()), ones, ones


def ringing(y: np.ndarray) -> Maps:
    g = _gradient(y)
    edges = g > EDGE
    band = ndimage.maximum_filter(edges, size=(1, 5, 5)) & ~edges
    flat = (g < FLAT) & ~band
    hp2 = _highpass(y) ** 2
    return (blocks(hp2 * band), blocks(band.astype(y.dtype)), blocks(hp2 * flat) + EPS,
            blocks(flat.astype(y.dtype)) + EPS)


def bleeding(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> Maps:
    chroma = np.repeat(np.repeat(_gradient(u) + _gradient(v), 2, axis=1), 2, axis=2)
    g = _gradient(y)
    edges = g > EDGE
    beside = ndimage.maximum_filter(edges, size=(1, 7, 7)) & (g < FLAT)
    return (blocks(chroma * beside), blocks(beside.astype(y.dtype)), blocks(chroma * edges) + EPS,
            blocks(edges.astype(y.dtype)) + EPS)


def _static(y: np.ndarray) -> np.ndarray:
    """(T-1, bh, bw): blocks whose mean |frame difference| is small (look static)."""
    return blocks(np.abs(np.diff(y, axis=0))) / BLOCK ** 2 < STATIC


def flicker(y: np.ndarray) -> Maps:
    means = blocks(y) / BLOCK ** 2
    static = _static(y).astype(y.dtype)
    ones = np.ones_like(static)
    return np.abs(np.diff(means, axis=0)) * static, static, ones, ones


def floating(y: np.ndarray) -> Maps:
    hp = _highpass(y)
    energy = blocks(hp ** 2) / BLOCK ** 2
    low_static = blocks(np.abs(np.diff(y - hp, axis=0))) / BLOCK ** 2 < STATIC
    keep = (low_static & (energy[1:] > TEXTURED) & (energy[:-1] > TEXTURED)).astype(y.dtype)
    change = blocks(np.abs(np.diff(hp, axis=0)))
    size = blocks(np.abs(hp[1:])) + EPS
    return change * keep, keep, size * keep + EPS, keep + EPS


def all_maps(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> dict[str, Maps]:
    """Every detector's maps of one video: spatial ones (T, bh, bw), temporal ones (T-1, bh, bw)."""
    return {"blocking": blocking(y), "blur": blur(y), "sharpness": sharpness(y), "ringing": ringing(y),
            "bleeding": bleeding(y, u, v), "flicker": flicker(y), "floating": floating(y)}


def pool(maps: Maps, weights: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray | float:
    """The detector's value under ``weights`` (same shape as the maps), summed over ``axes``
    (all: one number)."""
    a, ca, b, cb = (np.sum(m * weights, axis=axes) for m in maps)
    return (a / np.maximum(ca, EPS)) / np.maximum(b / np.maximum(cb, EPS), EPS)


def _normalise(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - lo
    return (x - lo) / np.maximum(span, EPS)


def spectral_residual(y: np.ndarray) -> np.ndarray:
    """Hou and Zhang's spectral residual of each frame's 4 x 4-block thumbnail, (T, H/4, W/4)."""
    t, h, w = y.shape
    thumb = y.reshape(t, h // 4, 4, w // 4, 4).mean(axis=(2, 4))
    spectrum = np.fft.fft2(thumb)
    log_amp = np.log(np.abs(spectrum) + EPS)
    residual = log_amp - ndimage.uniform_filter(log_amp, size=(1, 3, 3), mode="wrap")
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    return ndimage.gaussian_filter(saliency, (0, 1.5, 1.5))


def saliency(y: np.ndarray) -> np.ndarray:
    """(T, bh, bw) saliency weights on the block grid, each frame's summing to 1."""
    t, h, w = y.shape
    sr = spectral_residual(y)
    sr = sr.reshape(t, h // BLOCK, 2, w // BLOCK, 2).mean(axis=(2, 4))
    diff = np.abs(np.diff(y, axis=0))
    motion = blocks(np.concatenate([diff[:1], diff]) if t > 1 else np.zeros_like(y))
    bh, bw = h // BLOCK, w // BLOCK
    yy, xx = np.mgrid[0:bh, 0:bw]
    centre = np.exp(-(((yy - (bh - 1) / 2) / (0.35 * bh)) ** 2 + ((xx - (bw - 1) / 2) / (0.35 * bw)) ** 2) / 2)
    blend = 0.5 * _normalise(sr) + 0.3 * _normalise(motion) + 0.2 * centre[None]
    return blend / blend.sum(axis=(1, 2), keepdims=True)


def video_features(maps: dict[str, Maps], weights: np.ndarray) -> np.ndarray:
    """The seven detectors pooled over a whole video under per-frame block weights (T, bh, bw)
    (temporal detectors use frame t's weights for the step t-1 -> t)."""
    return np.array([pool(maps[d], weights if d in SPATIAL else weights[1:]) for d in DETECTORS])
