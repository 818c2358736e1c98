"""The one training helper of the torch workloads: device, parameters, local loop, cohort loop.

A torch workload keeps its model, its loss and its data; everything else is here, written once:

- ``select_device``: where training runs. ``run.num_gpus > 0`` (GPUs per Ray actor) asks for
  CUDA; otherwise the CPU with one torch thread (many small clients on few cores: tens of
  times faster than the default here, and float sums that do not depend on the core count).
  ``check_device`` is the scenario-time check of the same choice.
- ``set_params`` / ``get_params``: numpy ``Params`` <-> a module, by named parameters or by
  state_dict (``by=``), always float32 and always CPU numpy on the way out.
- ``train_steps``: the local loop. ``steps`` optimiser steps on batches from an index source
  (``numpy_epochs``, ``torch_epochs`` or ``full_batch``), the workload's loss, FedProx's
  (mu/2)||w - w_start||^2 when ``proximal_mu > 0``, a fresh optimiser per call (per client
  and round, as FedAvg clients usually do) and an optional LR scheduler.
- ``train_clients``: the per-client loop of a cohort. Each client loads its start parameters,
  trains, and its trained parameters are copied out into stacked numpy arrays.

Evaluation (local loss, central metrics) stays with the workloads, on the CPU.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

Params = dict[str, np.ndarray]
BY = ("parameters", "state_dict")
LossFn = Callable[..., torch.Tensor]  # (model, *batch tensors) -> scalar loss
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

# ---- device ----------------------------------------------------------------------------------


def num_gpus(scenario: dict[str, dict[str, Any]]) -> float:
    """The scenario's GPUs per Ray actor (``run.num_gpus``; 0 when absent)."""
    return float(scenario.get("run", {}).get("num_gpus", 0.0) or 0.0)


def check_device(scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Scenario-time check (for a torch workload's ``check_scenario``): GPUs asked for must exist."""
    gpus = num_gpus(scenario)
    if gpus > 0 and not torch.cuda.is_available():
        return [("run.num_gpus", f"asks for {gpus:g} GPU(s) per actor, but torch sees no CUDA device "
                 f"on this machine (torch {torch.__version__}); set run.num_gpus = 0 to train on the CPU")]
    return []


def select_device(scenario: dict[str, dict[str, Any]]) -> torch.device:
    """CUDA when the scenario asks for GPUs (``run.num_gpus > 0``), else the CPU.

    Either way torch uses one CPU thread: evaluation stays on the CPU, and several actors
    share a machine's cores."""
    problems = check_device(scenario)
    if problems:
        field, message = problems[0]
        raise ValueError(f"{field}: {message}")
    torch.set_num_threads(1)
    return torch.device("cuda") if num_gpus(scenario) > 0 else torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train on ``device``: the module itself on the CPU, a copy elsewhere (the
    workload's own module stays on the CPU for evaluation)."""
    return model if device.type == "cpu" else copy.deepcopy(model).to(device)


# ---- parameters ------------------------------------------------------------------------------


def _check_by(by: str) -> None:
    if by not in BY:
        raise ValueError(f"unknown parameter layout {by!r}; expected one of {BY}")


def set_params(model: nn.Module, params: Params, *, by: str = "parameters") -> nn.Module:
    """Copy numpy ``params`` (float32) into ``model`` (on whatever device it is); returns it."""
    _check_by(by)
    with torch.no_grad():
        if by == "state_dict":
            model.load_state_dict({n: torch.as_tensor(np.asarray(params[n], np.float32))
                                   for n in model.state_dict()})
        else:
            for name, p in model.named_parameters():
                p.copy_(torch.as_tensor(np.asarray(params[name]), dtype=torch.float32))
    return model


def _tensors(model: nn.Module, by: str) -> Iterator[tuple[str, torch.Tensor]]:
    _check_by(by)
    return iter(model.state_dict().items()) if by == "state_dict" else model.named_parameters()


def get_params(model: nn.Module, *, by: str = "parameters") -> Params:
    """The model's parameters as float32 CPU numpy arrays (copies)."""
    return {n: t.detach().cpu().numpy().astype(np.float32) for n, t in _tensors(model, by)}


# ---- index sources: which examples each step sees --------------------------------------------


def _nonempty(n: int) -> None:
    if n < 1:
        raise ValueError(f"cannot draw minibatches from {n} examples")


def numpy_epochs(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Minibatch indices, epoch after epoch, each epoch a fresh ``rng.permutation(n)`` cut into
    ``batch_size`` pieces (the last one shorter)."""
    _nonempty(n)
    while True:
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            yield order[lo:lo + batch_size]


def torch_epochs(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Minibatch indices, epoch after epoch, each epoch ``torch.randperm(n, generator)`` split
    into ``batch_size`` pieces."""
    _nonempty(n)
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def full_batch() -> Iterator[None]:
    """Every step sees every example."""
    return itertools.repeat(None)


def minibatches(
    tensors: Sequence[torch.Tensor], indices: Iterable[np.ndarray | torch.Tensor | None],
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The rows ``indices`` picks of each tensor (all rows for ``None``), on ``device``."""
    tensors = tuple(torch.as_tensor(t).to(device) for t in tensors)
    for idx in indices:
        if idx is None:
            yield tensors
        else:
            idx = torch.as_tensor(idx).to(tensors[0].device)
            yield tuple(t[idx] for t in tensors)


# ---- the local loop --------------------------------------------------------------------------


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu/2)||w - w_start||^2 over the model's parameters."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))


def train_steps(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Sequence[torch.Tensor]],
    *,
    steps: int,
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None = None,
    proximal_mu: float = 0.0,
) -> nn.Module:
    """``steps`` optimiser steps of ``loss_fn(model, *batch)`` over ``batches``, plus FedProx's
    term toward the parameters the call started from when ``proximal_mu > 0``. A fresh
    optimiser (and scheduler, stepped after each step) per call. Leaves the model in eval mode."""
    model.train()
    opt = optimizer(model.parameters())
    sched = scheduler(opt) if scheduler is not None else None
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    for _, batch in zip(range(steps), batches):
        loss = loss_fn(model, *batch)
        if anchor is not None:
            loss = loss + proximal_term(model, anchor, proximal_mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    model.eval()
    return model


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """``fn`` over ``x`` a chunk of ``rows`` at a time, concatenated, without autograd. On a CPU a
    conv net's forward pass over ten thousand patches at once is 2.5x slower than in chunks of
    512, best of three, and slower still in a long-lived process (the activations leave the
    caches; ``benchmarks/pmt_iqa.py --inference``)."""
    with torch.no_grad():
        return torch.cat([fn(x[i:i + rows]) for i in range(0, len(x), rows)]) if len(x) else fn(x)


# ---- the per-client loop ---------------------------------------------------------------------


def train_clients(
    model: nn.Module, start: Params, train: Callable[[int, nn.Module], Any], *, by: str = "parameters",
) -> Params:
    """For each client j of a cohort (axis 0 of ``start``): load its start parameters into
    ``model``, ``train(j, model)``, and copy the result into row j of stacked float32 arrays."""
    _check_by(by)
    out = {n: np.empty_like(v, dtype=np.float32) for n, v in start.items()}
    clients = len(next(iter(start.values()))) if start else 0
    for j in range(clients):
        set_params(model, {n: v[j] for n, v in start.items()}, by=by)
        train(j, model)
        for name, value in _tensors(model, by):
            out[name][j] = value.detach().cpu().numpy()
    return out
