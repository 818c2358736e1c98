"""Burgers trajectories for a federation: who holds what, generated deterministically.

Every trajectory is identified by (seed, viscosity group, index) and drawn from its own
random stream, so a client generates exactly its own trajectories, and a pooled client (the
centralised reference) holding indices 0..n-1 of a group holds the same ones as the group's
clients together. Client ``i`` belongs to group ``i % G`` and holds indices
``[slot * n, (slot + 1) * n)`` with ``slot = i // G``, on the grid ``grids[slot % len(grids)]``.
Fields are solved once on ``solver_points`` and subsampled to each grid (never re-solved).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from workloads import streams
from workloads.koopman.burgers import random_initial, solve

STREAM_TRAIN_DATA, STREAM_TEST_DATA = streams.KOOPMAN_TRAIN_DATA, streams.KOOPMAN_TEST_DATA


def initial_fields(seed: int, stream: int, group: int, indices: np.ndarray, points: int) -> np.ndarray:
    return np.stack([
        random_initial(1, points, np.random.default_rng(np.random.SeedSequence([seed, stream, group, int(i)])))[0]
        for i in indices
    ]) if len(indices) else np.empty((0, points))


def trajectories(seed: int, stream: int, group: int, nu: float, indices: np.ndarray,
                 times: np.ndarray, points: int, dt: float) -> np.ndarray:
    """(len(indices), len(times), points) float64 solutions of the group's trajectories."""
    u0 = initial_fields(seed, stream, group, indices, points)
    return solve(u0, nu, times, dt) if len(u0) else np.empty((0, len(times), points))


@lru_cache(maxsize=4)
def test_set(seed: int, viscosities: tuple[float, ...], count: int, times: tuple[float, ...],
             points: int, dt: float) -> tuple[np.ndarray, ...]:
    """Held-out trajectories per group, (count, len(times), points) each; cached per process
    (the server and the in-process baselines share them)."""
    return tuple(
        trajectories(seed, STREAM_TEST_DATA, g, nu, np.arange(count), np.asarray(times), points, dt)
        for g, nu in enumerate(viscosities)
    )


def subsample(fields: np.ndarray, points: int) -> np.ndarray:
    """A field on ``points`` grid points taken from a finer solve (last axis)."""
    stride = fields.shape[-1] // points
    if stride * points != fields.shape[-1]:
        raise ValueError(f"{points} points do not divide the solver grid of {fields.shape[-1]}")
    return fields[..., ::stride]
