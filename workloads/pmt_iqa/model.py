"""PMT-IQA's network in plain torch, scaled down: a four-stage CNN, the multi-scale module,
a shared trunk, the score head and the quality-level head; the arms' losses.

- **Backbone**: four stages (``widths``, stride 2 each: conv 3x3 + BN + ReLU twice), no
  pretraining (ImageNet weights are not available offline).
- **Multi-scale module (MS)**, the scaled-down LDA heads of PMT-IQA and HyperIQA: per stage
  a 1x1 conv to ``ms_dim`` channels, global average pooling and a linear layer to
  ``ms_dim``, concatenated (4 ``ms_dim``).
- **Single-task features (ST)**: the last stage pooled, a linear layer to the same size, so
  the trunk and heads are the same network in every arm.
- **Trunk**: Linear -> LeakyReLU -> Linear(``hidden``) -> LeakyReLU. **Heads**: the score
  (one linear unit, in tenths of the 0..100 score) and the quality level (Linear ->
  LeakyReLU -> Linear to 10 classes). Inference uses the score head only.

Arms (``ARMS``): ``single-task`` (ST features, L1 on the score), ``ms`` (MS, L1 only),
``ms-fixed`` (MS, L1 + cross-entropy at weights 1 and 1: multi-task without progression),
``pmt`` (MS, ``progress`` x L1 + (1 - ``progress``) x cross-entropy, ``progress`` going from
0 to 1 over the global rounds: easy to hard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workloads.pmt_iqa.data import QUALITY_LEVELS

ARMS = ("single-task", "ms", "ms-fixed", "pmt")
SCORE_SCALE = 10.0  # the score head predicts score / 10 (L1 and cross-entropy of similar size)


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class IQANet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), ms_dim: int = 16, hidden: int = 16) -> None:
        super().__init__()
        chans = (1, *widths)
        self.stages = nn.ModuleList(_stage(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.ms_convs = nn.ModuleList(nn.Conv2d(w, ms_dim, 1) for w in widths)
        self.ms_fcs = nn.ModuleList(nn.Linear(ms_dim, ms_dim) for _ in widths)
        feat = ms_dim * len(widths)
        self.st_fc = nn.Linear(widths[-1], feat)
        self.trunk = nn.Sequential(nn.Linear(feat, feat), nn.LeakyReLU(), nn.Linear(feat, hidden), nn.LeakyReLU())
        self.score_head = nn.Linear(hidden, 1)
        self.level_head = nn.Sequential(nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, QUALITY_LEVELS))
        with torch.no_grad():
            self.score_head.bias.fill_(5.0)  # mid-scale start (score / 10)

    def features(self, x: torch.Tensor, multi_scale: bool = True) -> torch.Tensor:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        if not multi_scale:
            return self.st_fc(maps[-1].mean((2, 3)))
        return torch.cat([fc(conv(m).mean((2, 3))) for m, conv, fc in zip(maps, self.ms_convs, self.ms_fcs)], 1)

    def heads(self, x: torch.Tensor, multi_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(self.features(x, multi_scale))
        return self.score_head(h).squeeze(1), self.level_head(h)

    def forward(self, x: torch.Tensor, multi_scale: bool = True) -> torch.Tensor:
        """The predicted score in 0..100 units."""
        return SCORE_SCALE * self.heads(x, multi_scale)[0]


def multi_scale(arm: str) -> bool:
    return arm != "single-task"


def task_weights(arm: str, progress: float) -> tuple[float, float]:
    """(weight of the score's L1, weight of the level's cross-entropy) of an arm; ``progress``
    in [0, 1] is how far training is (PMT: round r of R has (r - 1) / (R - 1))."""
    if arm not in ARMS:
        raise ValueError(f"unknown PMT-IQA arm {arm!r}; expected one of {list(ARMS)}")
    if arm in ("single-task", "ms"):
        return 1.0, 0.0
    if arm == "ms-fixed":
        return 1.0, 1.0
    p = min(1.0, max(0.0, float(progress)))
    return p, 1.0 - p


def arm_loss(model: IQANet, x: torch.Tensor, score: torch.Tensor, level: torch.Tensor, arm: str,
             progress: float) -> torch.Tensor:
    """The arm's training loss on a batch (``score`` in 0..100, ``level`` its class)."""
    w_reg, w_cls = task_weights(arm, progress)
    pred, logits = model.heads(x, multi_scale(arm))
    loss = w_reg * F.l1_loss(pred, score / SCORE_SCALE)
    if w_cls:
        loss = loss + w_cls * F.cross_entropy(logits, level)
    return loss
