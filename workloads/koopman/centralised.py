"""Centralised KNO training on one viscosity: the reference a federation is measured against,
and the acceptance checks of the model itself (accuracy, mesh independence, rollout)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from workloads.koopman.data import STREAM_TEST_DATA, STREAM_TRAIN_DATA, subsample, trajectories
from workloads.koopman.model import build, objective, relative_l2
from workloads.torch_train import minibatches, torch_epochs, train_steps


@dataclass
class Dataset:
    train: np.ndarray  # (n, snapshots, solver points) float64
    test: np.ndarray
    times: np.ndarray


def dataset(nu: float, train: int, test: int, *, group: int = 0, seed: int = 0, horizon: float = 0.5,
            snapshots: int = 11, points: int = 512, dt: float = 5e-4) -> Dataset:
    times = np.linspace(0.0, horizon, snapshots)
    return Dataset(
        trajectories(seed, STREAM_TRAIN_DATA, group, nu, np.arange(train), times, points, dt),
        trajectories(seed, STREAM_TEST_DATA, group, nu, np.arange(test), times, points, dt),
        times,
    )


def _tensor(fields: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(fields), dtype=torch.float32)


def train_model(data: Dataset, *, step: int, epochs: int, grid: int = 256, model: str = "kno",
                lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """A model from snapshot i to snapshot i + ``step`` (all such pairs of the training
    trajectories at ``grid`` points), one-cycle Adam; returns (model, seconds)."""
    torch.set_num_threads(1)
    fields = _tensor(subsample(data.train, grid))
    x = fields[:, :-step:step].reshape(-1, grid)[..., None]
    y = fields[:, step::step].reshape(-1, grid)[..., None]
    torch.manual_seed(seed)
    net = build(model, 1, 32, 16, 6)
    steps = epochs * -(-len(x) // batch_size)
    start = time.perf_counter()
    order = torch_epochs(len(x), batch_size, torch.Generator().manual_seed(seed))
    train_steps(net, objective, minibatches((x, y), order), steps=steps,
                optimizer=partial(torch.optim.Adam, lr=lr, weight_decay=1e-4),
                scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=lr, total_steps=steps))
    return net, time.perf_counter() - start


def rollout_errors(net: torch.nn.Module, data: Dataset, *, step: int, grid: int = 256) -> np.ndarray:
    """Mean relative L2 on the test trajectories after each application of the model, which
    advances ``step`` snapshots, until the last snapshot."""
    fields = _tensor(subsample(data.test, grid))
    u, errors = fields[:, 0], []
    with torch.no_grad():
        for i in range(step, fields.shape[1], step):
            u = net(u[..., None])[..., 0]
            errors.append(float(relative_l2(u, fields[:, i]).mean()))
    return np.array(errors)


def baseline_errors(data: Dataset, grid: int = 256) -> dict[str, float]:
    """Predicting u(T) by u0, and by zero (relative L2 1 by definition)."""
    fields = _tensor(subsample(data.test, grid))
    return {"u0": float(relative_l2(fields[:, 0], fields[:, -1]).mean()), "zero": 1.0}


def blind_floor(viscosities: tuple[float, ...], test: int, *, seed: int = 0, horizon: float = 0.5,
                grid: int = 256, points: int = 512, dt: float = 5e-4) -> dict[float, float]:
    """What any model that is not told ν can reach on each group's test fields: the mean of
    the solutions under every viscosity (the least-squares optimum for groups of equal
    weight), scored against the group's own solution."""
    from workloads.koopman.burgers import solve
    from workloads.koopman.data import initial_fields

    out = {}
    for g, nu in enumerate(viscosities):
        u0 = initial_fields(seed, STREAM_TEST_DATA, g, np.arange(test), points)
        finals = [subsample(solve(u0, other, np.array([0.0, horizon]), dt)[:, -1], grid) for other in viscosities]
        truth = finals[g]
        mean = np.mean(finals, axis=0)
        out[nu] = float(np.mean(np.linalg.norm(mean - truth, axis=1) / np.linalg.norm(truth, axis=1)))
    return out
