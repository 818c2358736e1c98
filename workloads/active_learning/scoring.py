"""Selection rules: how a client scores its unlabeled pool with the global model.

Wang et al. (AAAI 2022) label the samples whose label-free loss has the largest gradient
norm. The score is the paper's: the *sum over parameter tensors* of each tensor's L2 norm,
one sample at a time in eval mode. Two losses are proposed:

- ``expected-gradnorm``: the expected cross-entropy under the model's own prediction,
  sum_c p_c CE(z, c), with p kept in the graph (as in the official code);
- ``entropy-gradnorm``: the predictive entropy -sum_c p_c log p_c.

Since CE(z, c) = -log p_c these are the same function of the logits, so the two rules give
the same scores and select the same samples (tests pin this). Baselines: ``egl``, the
expected gradient length of Settles et al. (sum_c p_c ||grad CE(z, c)||, p treated as
constant, one global L2 norm: a different quantity), ``entropy`` (uncertainty sampling)
and ``random``.

Per-sample gradients are computed batched with ``torch.func`` (``vmap`` over ``grad``);
``gradnorm_scores_loop`` is the one-at-a-time reference the tests and benchmark compare with.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

RULES = ("random", "entropy", "egl", "expected-gradnorm", "entropy-gradnorm")
MODEL_RULES = RULES[1:]
CHUNK = 256  # samples per vmap chunk: bounds the memory of per-sample gradients

LossFn = Callable[[torch.Tensor], torch.Tensor]


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy -sum_c p_c log p_c of one sample's logits (C,)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def expected_ce_loss(logits: torch.Tensor) -> torch.Tensor:
    """sum_c p_c CE(z, c) of one sample's logits (C,), p left in the graph (official code)."""
    classes = torch.arange(logits.shape[-1])
    ce_per_class = F.cross_entropy(logits.expand(len(classes), -1), classes, reduction="none")
    return (F.softmax(logits, dim=-1) * ce_per_class).sum()


GRADNORM_LOSSES: dict[str, LossFn] = {
    "expected-gradnorm": expected_ce_loss,
    "entropy-gradnorm": entropy_loss,
}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def gradnorm_scores(model: nn.Module, images: torch.Tensor, loss: LossFn) -> torch.Tensor:
    """sum over parameter tensors of ||d loss(x) / d W||_2, for every sample, batched."""
    model.eval()

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, params, (x[None],))[0])

    grads = vmap(grad(loss_one), in_dims=(None, 0), chunk_size=CHUNK)(_params(model), images)
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).sum(0)


def gradnorm_scores_loop(model: nn.Module, images: torch.Tensor, loss: LossFn) -> torch.Tensor:
    """The official protocol: batch size 1, eval mode, backward, per-tensor norms summed."""
    model.eval()
    scores = []
    for x in images:
        model.zero_grad(set_to_none=True)
        loss(model(x[None])[0]).backward()
        scores.append(sum(p.grad.norm() for p in model.parameters()))
    model.zero_grad(set_to_none=True)
    return torch.stack(scores).detach()


def egl_scores(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Expected gradient length: sum_c p_c ||grad_W CE(f(x), c)||_2 over all parameters."""
    model.eval()
    classes = torch.arange(model(images[:1]).shape[-1])

    def ce_one(params: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (x[None],)), c[None])

    per_class = vmap(  # (N, C, *shape) per parameter tensor
        vmap(grad(ce_one), in_dims=(None, None, 0)), in_dims=(None, 0, None), chunk_size=CHUNK // 8
    )(_params(model), images, classes)
    lengths = sum(g.flatten(2).pow(2).sum(-1) for g in per_class.values()).sqrt()
    with torch.no_grad():
        p = F.softmax(model(images), dim=-1)
    return (p * lengths).sum(1)


def score_pool(rule: str, model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Scores of ``images`` under a model-based ``rule`` (higher = label first), float64.

    ``random`` needs no model: the caller draws it from each client's own stream.
    """
    if rule not in MODEL_RULES:
        raise ValueError(f"no model-based selection rule {rule!r}; expected one of {list(MODEL_RULES)}")
    if len(images) == 0:
        return np.empty(0)
    if rule == "entropy":
        with torch.no_grad():
            model.eval()
            scores = torch.vmap(entropy_loss)(model(images))
    elif rule == "egl":
        scores = egl_scores(model, images)
    else:
        scores = gradnorm_scores(model, images, GRADNORM_LOSSES[rule])
    return scores.detach().double().numpy()


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores; ties go to the lower position (deterministic)."""
    return np.argsort(-scores, kind="stable")[:k]
