"""The segmentation network, the fixed simplex ETF, the three losses and the metrics.

``UNet``: a small encoder-decoder in plain torch (no torchvision). Each level is two 3x3
conv-BN-ReLU layers; the encoder halves the resolution between levels (max-pool), the decoder
doubles it (transposed conv) and concatenates the encoder's skip. The last decoder level's
feature map F (``widths[0]`` channels, full resolution) feeds the 1x1 pixel ``classifier``.
The CeCo branch ``ceco_head`` (a 1x1 conv to ``head_dim``) reads the same F during training
only: ``forward`` never calls it, so dropping it changes no prediction and no inference cost.

``simplex_etf``: ``M = sqrt(K/(K-1)) U (I - 11^T/K)`` with ``U`` (d x K, orthonormal columns)
from the QR of a Gaussian draw seeded by the scenario seed alone: every client derives the
same M; it is a constant of the loss, never a parameter, so the server never sees it.

Losses (``loss_terms``): pixel cross-entropy; class-weighted cross-entropy (weights
``freq^-power`` from the client's own pixel counts, normalised so the pixel-weighted mean
weight is 1); and CeCo: cross-entropy plus ``lam`` times ``ceco_loss``, where each class
present in the batch gives one centre (the mean of Z = ceco_head(F) over its pixels),
L2-normalised, classified by its cosines with the ETF's columns over a temperature, each
present class counted once whatever its pixel count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workloads import streams


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), classes: int = 6, head_dim: int = 16,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in reversed(range(len(widths) - 1)))
        self.dec = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.classifier = nn.Conv2d(widths[0], classes, 1)
        self.ceco_head = nn.Conv2d(widths[0], head_dim, 1) if head_dim > 0 else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the pixel logits (the CeCo branch is not used)."""
        return self.classifier(self.features(x))


def branch_names(params: dict) -> list[str]:
    """The CeCo branch's entries of a state dict (dropped at inference)."""
    return [n for n in params if n.startswith("ceco_head.")]


def simplex_etf(classes: int, dim: int, seed: int) -> np.ndarray:
    """(dim, classes): unit columns, pairwise cosine -1/(classes-1); needs dim >= classes."""
    if dim < classes:
        raise ValueError(f"a simplex ETF of {classes} classes by QR needs dim >= {classes}, got {dim}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, streams.CECO_ETF]))
    u, _ = np.linalg.qr(rng.standard_normal((dim, classes)))
    return np.sqrt(classes / (classes - 1)) * u @ (np.eye(classes) - np.ones((classes, classes)) / classes)


def class_centres(z: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres of the present classes (P, d), their class ids (P,)): the mean of z (B, d, H, W)
    over each class's pixels."""
    d = z.shape[1]
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    y = labels.reshape(-1)
    counts = torch.bincount(y, minlength=classes)
    sums = torch.zeros(classes, d, dtype=z.dtype, device=z.device).index_add_(0, y, flat)
    present = torch.nonzero(counts > 0).squeeze(1)
    return sums[present] / counts[present, None].to(z.dtype), present


def ceco_loss(z: torch.Tensor, labels: torch.Tensor, etf: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each present class's normalised centre classified against the fixed ETF's columns;
    the mean over present classes (each once)."""
    centres, present = class_centres(z, labels, etf.shape[1])
    scores = F.normalize(centres, dim=1) @ etf / temperature
    return F.cross_entropy(scores, present)


def class_weights(masks: np.ndarray, classes: int, power: float) -> torch.Tensor:
    """Inverse-frequency weights ``freq^-power`` from a client's own pixels (a class it never
    sees counts one pixel), scaled so that the pixel-weighted mean weight is 1."""
    counts = np.bincount(np.asarray(masks).ravel(), minlength=classes).astype(np.float64) + 1.0
    freq = counts / counts.sum()
    w = freq ** -power
    return torch.tensor(w / (freq * w).sum(), dtype=torch.float32)


def loss_terms(model: UNet, x: torch.Tensor, y: torch.Tensor, arm: str, *, etf: torch.Tensor | None = None,
               weights: torch.Tensor | None = None, lam: float = 0.0,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the arm's training loss, the CeCo term alone or None)."""
    feats = model.features(x)
    logits = model.classifier(feats)
    if arm == "weighted-ce":
        return F.cross_entropy(logits, y, weight=weights), None
    seg = F.cross_entropy(logits, y)
    if arm != "ceco":
        return seg, None
    reg = ceco_loss(model.ceco_head(feats), y, etf, temperature)
    return seg + lam * reg, reg


# ---- metrics ---------------------------------------------------------------------------------


def confusion(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """(true, predicted) pixel counts."""
    idx = np.asarray(truth).ravel() * classes + np.asarray(pred).ravel()
    return np.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix (NaN for a class absent from both)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def etf_closeness(means: np.ndarray) -> float:
    """Mean over class pairs of |cos + 1/(K-1)| of the class means centred by their mean and
    normalised: 0 for a simplex ETF."""
    k = len(means)
    c = means - means.mean(0, keepdims=True)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    cos = c @ c.T
    iu = np.triu_indices(k, 1)
    return float(np.mean(np.abs(cos[iu] + 1.0 / (k - 1))))


def etf_distance(centres: np.ndarray, etf: np.ndarray) -> float:
    """Mean over classes of 1 - cos(centre_k, ETF column k): how far the CeCo branch's
    (uncentred) class centres lie from their fixed targets; 0 when on them."""
    c = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    m = etf.T / np.linalg.norm(etf.T, axis=1, keepdims=True)
    return float(np.mean(1.0 - (c * m).sum(1)))
