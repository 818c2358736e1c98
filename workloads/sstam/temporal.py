"""The temporal artifact detector: a tiny TimeSformer (divided space-time attention) that
tells, from the decoded video alone, whether a short clip of a region flickers or floats.

- **Clips**: ``CLIP`` frames of a ``PATCH`` x ``PATCH`` luma region (windows of the video at
  frames 0, 8, 16; a 5 x 4 grid of regions at 160 x 128), tokenised into 8 x 8 pixel patches:
  16 tokens a frame. A token carries its pixels (minus the clip's mean) and its difference
  to the same patch one frame earlier, the cue both artifacts live in.
- **Labels the generator knows** (full reference: the source is at hand when the data are
  made, never at prediction): ``flicker`` when the coding error's 8 x 8 block means jump
  between frames (a luminance fluctuation the source does not have) by more than the
  detector-training set's median; ``floating`` when, in a region that is still in the
  source, the coding error's high-pass texture changes between frames by more than the
  median (texture that moves where nothing moves). Floating is undefined (masked) where
  the source moves.
- **Model**: a linear token embedding with learned space and time positions; ``depth``
  blocks of divided attention (time attention per location, then space attention per frame,
  then an MLP; pre-norm, residual), mean pooling, two logits. About 40k parameters.

It is trained once, centrally, on its own set of contents (other seeds than any client's),
as the paper's detectors are trained on a labelled artifact database before use; clients
only run it (``predict``) to compute their features.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workloads import streams
from workloads.sstam.detectors import BLOCK

CLIP = 8
PATCH = 32
TOKEN = 8
WINDOWS = (0, 8, 16)  # first frame of each clip window
HEADS = ("flicker", "floating")


def clips(y: np.ndarray) -> np.ndarray:
    """(windows x regions, CLIP, PATCH, PATCH) clips of a luma video (T, H, W)."""
    t, h, w = y.shape
    out = [y[s:s + CLIP, i:i + PATCH, j:j + PATCH] for s in WINDOWS if s + CLIP <= t
           for i in range(0, h - PATCH + 1, PATCH) for j in range(0, w - PATCH + 1, PATCH)]
    return np.stack(out)


def clip_weights(weights: np.ndarray) -> np.ndarray:
    """Saliency weights (T, bh, bw) summed over each clip's frames and region, in ``clips``'
    order (the weight of the clip's prediction when a video's scores are pooled)."""
    t, bh, bw = weights.shape
    r = PATCH // BLOCK
    return np.array([weights[s:s + CLIP, i:i + r, j:j + r].sum() for s in WINDOWS if s + CLIP <= t
                     for i in range(0, bh - r + 1, r) for j in range(0, bw - r + 1, r)])


def _block_means(x: np.ndarray) -> np.ndarray:
    n, t, h, w = x.shape
    return x.reshape(n, t, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(3, 5))


def intensities(reference: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full-reference (flicker, floating) intensity of each clip, from the source's and the
    decoded clips (n, CLIP, PATCH, PATCH); floating is NaN where the source moves."""
    from scipy import ndimage

    error = decoded - reference
    flicker = np.abs(np.diff(_block_means(error), axis=1)).mean(axis=(1, 2, 3))
    highpass = error - ndimage.gaussian_filter(error, (0, 0, 1.0, 1.0))
    floating = np.abs(np.diff(highpass, axis=1)).mean(axis=(1, 2, 3))
    still = np.abs(np.diff(reference, axis=1)).max(axis=(1, 2, 3)) < 0.5 / 255
    return flicker, np.where(still, floating, np.nan)


def classical_scores(decoded: np.ndarray) -> np.ndarray:
    """The classical no-reference detectors (``detectors.flicker``, ``floating``) pooled over
    each clip with equal weights: (n, 2), the baseline the model must beat."""
    from workloads.sstam import detectors

    out = np.zeros((len(decoded), 2))
    for i, clip in enumerate(decoded):
        for h, fn in enumerate((detectors.flicker, detectors.floating)):
            maps = fn(clip)
            out[i, h] = detectors.pool(maps, np.ones_like(maps[0]))
    return out


class DividedBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_t, self.norm_s, self.norm_m = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.time = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.space = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, S, D)
        b, t, s, d = x.shape
        xt = self.norm_t(x).transpose(1, 2).reshape(b * s, t, d)  # each location over time
        x = x + self.time(xt, xt, xt, need_weights=False)[0].reshape(b, s, t, d).transpose(1, 2)
        xs = self.norm_s(x).reshape(b * t, s, d)  # each frame over space
        x = x + self.space(xs, xs, xs, need_weights=False)[0].reshape(b, t, s, d)
        return x + self.mlp(self.norm_m(x))


class TinyTimeSformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        tokens = (PATCH // TOKEN) ** 2
        self.embed = nn.Linear(2 * TOKEN * TOKEN, dim)
        self.space_pos = nn.Parameter(0.02 * torch.randn(1, 1, tokens, dim))
        self.time_pos = nn.Parameter(0.02 * torch.randn(1, CLIP, 1, dim))
        self.blocks = nn.ModuleList(DividedBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(HEADS))

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        """(B, CLIP, PATCH, PATCH) luma in [0, 1] -> (B, CLIP, tokens, 2 * TOKEN^2): pixels
        about the clip's mean and their change since the previous frame (zero at the first),
        scaled up so that a one-level step (1/255) is visible to the embedding."""
        b, t, h, w = x.shape
        x = x - x.mean(dim=(1, 2, 3), keepdim=True)
        step = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
        def tile(z: torch.Tensor) -> torch.Tensor:
            z = z.reshape(b, t, h // TOKEN, TOKEN, w // TOKEN, TOKEN).permute(0, 1, 2, 4, 3, 5)
            return z.reshape(b, t, (h // TOKEN) * (w // TOKEN), TOKEN * TOKEN)
        return torch.cat([4 * tile(x), 50 * tile(step)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(self.tokens(x)) + self.space_pos + self.time_pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z).mean(dim=(1, 2)))


def train(x: np.ndarray, labels: np.ndarray, *, steps: int, seed: int, batch: int = 64,
          lr: float = 2e-3) -> TinyTimeSformer:
    """Train on uint8 clips (n, CLIP, PATCH, PATCH) and 0/1 labels (n, 2), NaN masked."""
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(int(np.random.SeedSequence([seed, streams.SSTAM_TEMPORAL_INIT]).generate_state(1)[0]))
        model = TinyTimeSformer()
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams.SSTAM_CLIPS]))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    target = torch.from_numpy(np.nan_to_num(labels, nan=0.0).astype(np.float32))
    known = torch.from_numpy(~np.isnan(labels))
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        logits = model(torch.from_numpy(x[idx].astype(np.float32) / 255))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target[idx], reduction="none")
        loss = (loss * known[idx]).sum() / known[idx].sum().clamp(min=1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: TinyTimeSformer, x: np.ndarray, rows: int = 512) -> np.ndarray:
    """(n, 2) probabilities of flicker and floating for float clips in [0, 1]."""
    out = [torch.sigmoid(model(torch.as_tensor(x[i:i + rows], dtype=torch.float32))).numpy()
           for i in range(0, len(x), rows)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for binary ``label`` (NaN labels left out)."""
    from sklearn.metrics import roc_auc_score

    keep = ~np.isnan(label) & np.isfinite(score)
    if len(np.unique(label[keep])) < 2:
        return float("nan")
    return float(roc_auc_score(label[keep], score[keep]))


__all__ = ["CLIP", "HEADS", "PATCH", "TinyTimeSformer", "auc", "classical_scores", "clip_weights", "clips",
           "intensities", "predict", "train"]
