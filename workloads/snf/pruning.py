"""Widths under a FLOPs budget, the candidates of the search, and the filters each width keeps.

A *width configuration* is the number of filters each block's first conv keeps. The
budget of a FLOPs cut c is ``(1 - c) * flops(dense)``; a configuration fits it when its FLOPs
lie in ``[budget - tolerance * dense, budget]`` (``fits``), and every layer keeps at least
``ceil(min_keep * width)`` filters.

- ``uniform_widths``: the same keep ratio in every layer, the largest that fits.
- ``random_widths``: per-layer keep ratios drawn uniformly in ``[min_keep, 1]``, then
  ``repair``: one common scale found by bisection so the FLOPs fall under the budget, then
  single filters added to random layers while they still fit (so the FLOPs land within the
  tolerance below the budget).
- ``candidates``: the search's pool, the uniform widths first and ``count - 1`` random ones.
- ``keep_filters``: which filters a layer keeps, by a criterion on the global model's weights
  (``CRITERIA``: the L1 or L2 norm of each filter, the magnitude of its BN scale, or a
  seeded random choice). Every client computes the same choice from the same global model.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from workloads.snf.model import Arch, flops


class BudgetError(ValueError):
    """No configuration of the search space fits the FLOPs budget."""


def budget(arch: Arch, cut: float) -> int:
    return int(math.floor((1.0 - cut) * flops(arch)))


def floor_widths(arch: Arch, min_keep: float) -> np.ndarray:
    return np.array([max(1, math.ceil(min_keep * w - 1e-9)) for w in arch.block_widths], np.int64)


def fits(arch: Arch, widths: np.ndarray, cut: float, tolerance: float, min_keep: float) -> bool:
    f = flops(arch, widths)
    return (budget(arch, cut) - tolerance * flops(arch) <= f <= budget(arch, cut)
            and bool(np.all(widths >= floor_widths(arch, min_keep)))
            and bool(np.all(widths <= np.array(arch.block_widths))))


def _scaled(arch: Arch, ratios: np.ndarray, s: float, low: np.ndarray) -> np.ndarray:
    dense = np.array(arch.block_widths)
    return np.clip(np.floor(s * ratios * dense + 1e-9).astype(np.int64), low, dense)


def repair(arch: Arch, ratios: np.ndarray, cut: float, tolerance: float, min_keep: float,
           rng: np.random.Generator | None) -> np.ndarray:
    """Widths proportional to ``ratios`` (keep ratios per layer) that fit the budget: the
    largest common scale under the budget (bisection), then one filter at a time to layers
    that still fit (random layers with ``rng``; without, the layer with the lowest keep ratio)."""
    dense, low, target = np.array(arch.block_widths), floor_widths(arch, min_keep), budget(arch, cut)
    if flops(arch, low) > target:
        raise BudgetError(f"a {cut:.0%} FLOPs cut leaves {target} MACs, fewer than the "
                          f"{flops(arch, low)} of every layer at min_keep = {min_keep:g}")
    lo, hi = 0.0, 1.0 / max(float(np.min(ratios)), 1e-6)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if flops(arch, _scaled(arch, ratios, mid, low)) <= target else (lo, mid)
    widths = _scaled(arch, ratios, lo, low)
    while True:  # fill the slack one filter at a time
        room = [i for i in range(len(dense)) if widths[i] < dense[i]
                and flops(arch, widths + np.eye(len(dense), dtype=np.int64)[i]) <= target]
        if not room:
            break
        if rng is None:  # the layer furthest below its dense width (stays near one ratio)
            i = min(room, key=lambda i: (widths[i] / dense[i], i))
        else:
            i = int(rng.choice(room))
        widths[i] += 1
    if not fits(arch, widths, cut, tolerance, min_keep):
        raise BudgetError(f"widths {widths.tolist()} ({flops(arch, widths)} MACs) miss the budget "
                          f"[{target - tolerance * flops(arch):.0f}, {target}] of a {cut:.0%} cut")
    return widths


def uniform_widths(arch: Arch, cut: float, tolerance: float, min_keep: float) -> np.ndarray:
    """The same keep ratio in every layer (the largest under the budget), then filled up."""
    return repair(arch, np.ones(len(arch.block_widths)), cut, tolerance, min_keep, None)


def random_widths(arch: Arch, cut: float, tolerance: float, min_keep: float,
                  rng: np.random.Generator) -> np.ndarray:
    ratios = rng.uniform(min_keep, 1.0, len(arch.block_widths))
    return repair(arch, ratios, cut, tolerance, min_keep, rng)


def candidates(arch: Arch, cut: float, tolerance: float, min_keep: float, count: int,
               rng: np.random.Generator) -> np.ndarray:
    """(count, layers): the uniform widths, then ``count - 1`` random configurations."""
    pool = [uniform_widths(arch, cut, tolerance, min_keep)]
    pool += [random_widths(arch, cut, tolerance, min_keep, rng) for _ in range(count - 1)]
    return np.stack(pool)


# ---- which filters a layer keeps ---------------------------------------------------------


def _l1(w: np.ndarray, bn_scale: np.ndarray) -> np.ndarray:
    return np.abs(w).reshape(len(w), -1).sum(axis=1)


def _l2(w: np.ndarray, bn_scale: np.ndarray) -> np.ndarray:
    return np.sqrt((w.astype(np.float64) ** 2).reshape(len(w), -1).sum(axis=1))


def _bn_scale(w: np.ndarray, bn_scale: np.ndarray) -> np.ndarray:
    return np.abs(bn_scale)


CRITERIA: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray] | None] = {
    "l1": _l1, "l2": _l2, "bn-scale": _bn_scale, "random": None,
}


def filter_scores(criterion: str, weight: np.ndarray, bn_scale: np.ndarray,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """One importance score per filter (output channel) of a conv weight (C_out, C_in, k, k)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {list(CRITERIA)}")
    fn = CRITERIA[criterion]
    if fn is None:
        if rng is None:
            raise ValueError("the random criterion needs a generator")
        return rng.random(len(weight))
    return fn(np.asarray(weight, np.float64), np.asarray(bn_scale, np.float64))


def keep_filters(scores: np.ndarray, keep: int) -> np.ndarray:
    """The 0/1 mask of the ``keep`` highest-scored filters (ties: the lower index)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:keep]
    mask = np.zeros(len(scores), np.float32)
    mask[order] = 1.0
    return mask
