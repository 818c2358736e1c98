"""A small CIFAR-style ResNet in plain torch, with per-block channel masks, and its FLOPs.

``ResNet(widths=(16, 32, 64), blocks=2)``: a 3x3 stem, three stages of ``blocks`` basic
blocks (two 3x3 convs with batch norm; a 1x1 conv + BN projection where the shape changes),
global average pooling and a linear head. With the defaults on 16x16 inputs it is the
spec's ResNet-14: 6,591,104 multiply-accumulates (MACs) of conv and linear layers.

Only the first conv of each block is pruned (the residual additions stay aligned). A block's
``mask`` (one 0/1 entry per filter of its first conv) multiplies that conv's activation after
BN and ReLU, so a masked filter contributes nothing downstream: the masked dense model
computes exactly what the compact model (``compact``: those filters and the matching input
channels of the block's second conv removed) computes. The masks are buffers, carried with the
parameters (``mask.<block>``), so FedAvg of clients sharing a mask keeps it.

FLOPs are counted as MACs of conv and linear layers, the pruning papers' convention:
``flops(widths)`` analytically, ``count_macs(model, x)`` by forward hooks (batch norm,
ReLU and the residual additions are not counted by either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class BatchNorm(nn.BatchNorm2d):
    """Batch norm without a step counter: its state is weights and running statistics, plain
    averages that clients aggregate (momentum 0.1, never a cumulative average)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # skip _NormBase's insertion of a num_batches_tracked entry
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def _bn(channels: int) -> nn.BatchNorm2d:
    return BatchNorm(channels)


class Block(nn.Module):
    """conv3x3 - BN - ReLU - (mask) - conv3x3 - BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, mid: int | None = None) -> None:
        super().__init__()
        mid = c_out if mid is None else mid
        self.conv1 = nn.Conv2d(c_in, mid, 3, stride, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv2 = nn.Conv2d(mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = _bn(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _bn(c_out))
        self.register_buffer("mask", torch.ones(mid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x))) * self.mask[None, :, None, None]
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


@dataclass(frozen=True)
class Arch:
    """The shape of the network: stage widths, blocks per stage, input side and classes."""

    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 2
    side: int = 16
    classes: int = 10

    @property
    def block_widths(self) -> tuple[int, ...]:
        """The dense width of every block's first conv (the prunable layers), in order."""
        return tuple(w for w in self.widths for _ in range(self.blocks))

    def layout(self) -> list[tuple[int, int, int, int]]:
        """Per block: (input channels, output channels, stride, input side)."""
        out, c_in, side = [], self.widths[0], self.side
        for s, w in enumerate(self.widths):
            for b in range(self.blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                out.append((c_in, w, stride, side))
                side = (side - 1) // stride + 1
                c_in = w
        return out


class ResNet(nn.Module):
    def __init__(self, arch: Arch = Arch(), mids: tuple[int, ...] | None = None) -> None:
        """``mids``: the first-conv width of each block (default: the dense widths); a
        compact pruned network has smaller ones."""
        super().__init__()
        self.arch = arch
        mids = arch.block_widths if mids is None else tuple(mids)
        self.stem = nn.Conv2d(1, arch.widths[0], 3, 1, 1, bias=False)
        self.bn = _bn(arch.widths[0])
        self.blocks = nn.ModuleList(Block(c_in, c_out, stride, m)
                                    for (c_in, c_out, stride, _), m in zip(arch.layout(), mids))
        self.head = nn.Linear(arch.widths[-1], arch.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))


def param_names(model: ResNet) -> list[str]:
    """The arrays a model travels as: its state (weights, BN statistics, masks)."""
    return list(model.state_dict())


def mask_names(arch: Arch) -> list[str]:
    return [f"blocks.{i}.mask" for i in range(len(arch.block_widths))]


def flops(arch: Arch, mids: tuple[int, ...] | list[int] | np.ndarray | None = None) -> int:
    """MACs of conv and linear layers of the network whose blocks' first convs keep
    ``mids`` filters (default: all), by hand: k^2 * C_in * C_out * H_out * W_out per conv."""
    mids = arch.block_widths if mids is None else [int(m) for m in mids]
    side = arch.side
    total = 9 * 1 * arch.widths[0] * side * side  # stem
    for (c_in, c_out, stride, side_in), m in zip(arch.layout(), mids):
        side = (side_in - 1) // stride + 1
        total += 9 * c_in * m * side * side  # conv1
        total += 9 * m * c_out * side * side  # conv2
        if stride != 1 or c_in != c_out:
            total += c_in * c_out * side * side  # 1x1 projection
    return total + arch.widths[-1] * arch.classes


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward pass of one example through ``model``'s conv and linear layers,
    counted by forward hooks (the check of ``flops``)."""
    total = [0]

    def conv_hook(m: nn.Conv2d, inputs, output) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += k * (m.in_channels // m.groups) * m.out_channels * output.shape[2] * output.shape[3]

    def linear_hook(m: nn.Linear, inputs, output) -> None:
        total[0] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def compact(model: ResNet) -> ResNet:
    """The physically smaller network that computes what the masked ``model`` computes:
    each block keeps the filters its mask keeps (conv1 rows, BN1 entries, conv2 input
    channels); every other array is copied."""
    keep = [torch.nonzero(b.mask > 0.5).flatten() for b in model.blocks]
    small = ResNet(model.arch, tuple(len(k) for k in keep))
    state = model.state_dict()
    new = {}
    for name, value in small.state_dict().items():
        src = state[name]
        parts = name.split(".")
        if parts[0] == "blocks":
            i, leaf = int(parts[1]), ".".join(parts[2:])
            k = keep[i]
            if leaf in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "mask"):
                src = src[k]
            elif leaf == "conv2.weight":
                src = src[:, k]
        new[name] = src.clone()
    small.load_state_dict(new)
    return small.train(model.training)
