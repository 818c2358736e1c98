"""Mixed linear regression on a synthetic federation (Su, Xu, Yang, NeurIPS 2022 setting).

Client i belongs to one of k clusters z_i and holds n_i points
``y = <x, theta*_{z_i}> + noise`` with ``x ~ N(0, I_d)`` and noise ``N(0, sigma^2)``.
The k true models sit on a sphere, scaled so that their minimum pairwise distance equals
``separation``. Anchor clients (ids ``0..anchors.count-1``) hold ``anchors.size`` points and
cover the clusters round-robin.

Everything is vectorised over a cohort: the points of all its clients are concatenated and
per-client sums use ``np.add.reduceat``, whose per-segment sums are sequential. Per-client
results therefore do not depend on which other clients share the cohort, which is what makes
runs bit-identical across cohort sizes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from workloads.base import (
    CohortData,
    ConfigField,
    Params,
    TrainSettings,
    Workload,
    non_negative,
    positive,
)
from workloads.federation import BLOCK, STREAM_TRUTH, block_rng, draw_sizes

# Local GD step cap for tiny clients: eta_i = min(eta, STEP_CAP / lambda_max(X_i'X_i / n_i)).
# The Hessian of the mean squared loss is 2 X'X/n, so this keeps every step contractive.
STEP_CAP = 0.5


@dataclass
class LinearCohort:
    """The concatenated points of a cohort of clients."""

    client_ids: np.ndarray  # (B,)
    num_examples: np.ndarray  # (B,)
    labels: np.ndarray  # (B,) true cluster of each client
    x: np.ndarray  # (P, d)
    y: np.ndarray  # (P,)
    starts: np.ndarray = field(init=False)  # (B,) first point of each client
    owner: np.ndarray = field(init=False)  # (P,) client index of each point

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.num_examples)[:-1]]).astype(np.int64)
        self.owner = np.repeat(np.arange(len(self.client_ids)), self.num_examples)

    def client_sum(self, per_point: np.ndarray) -> np.ndarray:
        """Sum a per-point array over each client's points (sequential, order-stable)."""
        return np.add.reduceat(per_point, self.starts, axis=0)

    @cached_property
    def gram(self) -> np.ndarray:
        """(B, d, d): X_i'X_i / n_i, needed by the FedProx closed form and the step cap."""
        outer = self.x[:, :, None] * self.x[:, None, :]
        return self.client_sum(outer) / self.num_examples[:, None, None]

    @cached_property
    def moment(self) -> np.ndarray:
        """(B, d): X_i'y_i / n_i."""
        return self.client_sum(self.x * self.y[:, None]) / self.num_examples[:, None]

    @cached_property
    def lambda_max(self) -> np.ndarray:
        """(B,): largest eigenvalue of X_i'X_i / n_i."""
        return np.linalg.eigvalsh(self.gram)[:, -1]


class MixedRegression(Workload):
    name = "mixed_regression"
    section = "mixed_regression"
    key_metric = "estimation_error"
    loss_name = "mse"
    schema = {
        "dim": ConfigField(int, 20, "dimension d of the covariates", positive),
        "clusters": ConfigField(int, 4, "number k of true models", positive),
        "noise": ConfigField(float, 0.1, "noise standard deviation sigma", non_negative),
        "separation": ConfigField(
            float, 0.8, "minimum distance between two true models", positive
        ),
        "cluster_weights": ConfigField(
            list, None, "probability of each cluster (default: uniform)"
        ),
    }

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        errors = []
        mr, fed, anchors = scenario[cls.section], scenario["federation"], scenario["anchors"]
        k = mr["clusters"]
        if k > fed["clients"]:
            errors.append(
                (
                    "mixed_regression.clusters",
                    f"{k} clusters but only {fed['clients']} clients (federation.clients); "
                    "expected clusters <= clients",
                )
            )
        weights = mr["cluster_weights"]
        if weights is not None:
            if len(weights) != k:
                errors.append(
                    (
                        "mixed_regression.cluster_weights",
                        f"has {len(weights)} entries, expected one per cluster ({k})",
                    )
                )
            elif not all(isinstance(w, (int, float)) and w > 0 for w in weights):
                errors.append(
                    ("mixed_regression.cluster_weights", "expected positive numbers")
                )
        if anchors["count"] > fed["clients"]:
            errors.append(
                (
                    "anchors.count",
                    f"{anchors['count']} anchors but only {fed['clients']} clients",
                )
            )
        return errors

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        fed, mr, anchors = scenario["federation"], scenario[self.section], scenario["anchors"]
        self.seed = int(fed["seed"])
        self.num_clients = int(fed["clients"])
        self.size_law = fed["size_law"]
        self.min_size, self.max_size = int(fed["min_size"]), int(fed["max_size"])
        self.zipf_exponent = float(fed["zipf_exponent"])
        self.dim, self.k = int(mr["dim"]), int(mr["clusters"])
        self.noise, self.separation = float(mr["noise"]), float(mr["separation"])
        weights = mr["cluster_weights"] or [1.0] * self.k
        self.cluster_weights = np.asarray(weights, dtype=float) / float(np.sum(weights))
        self.anchor_count, self.anchor_size = int(anchors["count"]), int(anchors["size"])
        self.true_models = true_models(self.seed, self.k, self.dim, self.separation)
        self._blocks: dict[int, LinearCohort] = {}

    # ---- data -------------------------------------------------------------------------

    def _block(self, b: int) -> LinearCohort:
        """All ``BLOCK`` clients of generation block ``b`` (ids beyond the federation included,
        so that a client's data never depend on the federation size)."""
        if b not in self._blocks:
            rng = block_rng(self.seed, b)
            ids = np.arange(b * BLOCK, (b + 1) * BLOCK, dtype=np.int64)
            sizes = draw_sizes(
                rng, BLOCK, self.size_law, self.min_size, self.max_size, self.zipf_exponent
            )
            labels = rng.choice(self.k, size=BLOCK, p=self.cluster_weights)
            is_anchor = ids < self.anchor_count
            sizes[is_anchor] = self.anchor_size
            labels[is_anchor] = ids[is_anchor] % self.k
            x = rng.standard_normal((int(sizes.sum()), self.dim))
            noise = self.noise * rng.standard_normal(len(x))
            y = np.einsum("pd,pd->p", x, self.true_models[np.repeat(labels, sizes)]) + noise
            self._blocks[b] = LinearCohort(ids, sizes, labels, x, y)
        return self._blocks[b]

    def client_data(self, client_ids: np.ndarray) -> LinearCohort:
        client_ids = np.asarray(client_ids, dtype=np.int64)
        if len(client_ids) == 0:
            raise ValueError("a cohort needs at least one client")
        if client_ids.min() < 0 or client_ids.max() >= self.num_clients:
            raise ValueError(
                f"client ids must lie in [0, {self.num_clients}); got "
                f"[{client_ids.min()}, {client_ids.max()}]"
            )
        parts_x, parts_y, sizes, labels = [], [], [], []
        blocks = client_ids // BLOCK
        for b in np.unique(blocks):
            blk = self._block(int(b))
            local = client_ids[blocks == b] - b * BLOCK
            ends = blk.starts + blk.num_examples
            point_idx = np.concatenate([np.arange(blk.starts[i], ends[i]) for i in local])
            parts_x.append(blk.x[point_idx])
            parts_y.append(blk.y[point_idx])
            sizes.append(blk.num_examples[local])
            labels.append(blk.labels[local])
        return LinearCohort(
            client_ids,
            np.concatenate(sizes),
            np.concatenate(labels),
            np.concatenate(parts_x),
            np.concatenate(parts_y),
        )

    # ---- model ------------------------------------------------------------------------

    def initial_parameters(self) -> Params:
        return {"w": np.zeros(self.dim)}

    def local_loss(self, params: Params, data: CohortData) -> np.ndarray:
        assert isinstance(data, LinearCohort)
        residual = np.einsum("pd,d->p", data.x, params["w"]) - data.y
        return data.client_sum(residual**2) / data.num_examples

    def local_train(self, start: Params, data: CohortData, settings: TrainSettings) -> Params:
        assert isinstance(data, LinearCohort)
        w = np.array(start["w"], dtype=float, copy=True)  # (B, d)
        if settings.proximal_mu > 0:
            # FedProx, exact: argmin_w ||X w - y||^2/n + (mu/2)||w - w0||^2.
            mu = settings.proximal_mu
            lhs = 2.0 * data.gram + mu * np.eye(self.dim)
            rhs = 2.0 * data.moment + mu * w
            return {"w": np.linalg.solve(lhs, rhs[..., None])[..., 0]}
        step = np.minimum(settings.lr, STEP_CAP / data.lambda_max)
        for _ in range(settings.local_steps):
            residual = np.einsum("pd,pd->p", data.x, w[data.owner]) - data.y
            grad = 2.0 * data.client_sum(data.x * residual[:, None]) / data.num_examples[:, None]
            w -= step[:, None] * grad
        return {"w": w}

    # ---- central metrics ----------------------------------------------------------------

    def central_metrics(self, models: list[Params]) -> dict[str, float]:
        estimates = np.stack([m["w"] for m in models])
        return {"estimation_error": estimation_error(estimates, self.true_models)}


def true_models(seed: int, k: int, dim: int, separation: float) -> np.ndarray:
    """k models on a sphere whose minimum pairwise distance is exactly ``separation``.

    Directions are uniform; draws with two nearly parallel directions are redrawn (so that
    rescaling to the separation does not blow up the norms).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_TRUTH]))
    if k == 1:
        u = rng.standard_normal(dim)
        return (separation * u / np.linalg.norm(u))[None]
    for _ in range(10_000):
        u = rng.standard_normal((k, dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        gap = min(np.linalg.norm(a - b) for a, b in itertools.combinations(u, 2))
        if gap >= 0.5:
            return u * (separation / gap)
    raise ValueError(
        f"could not place {k} well-separated models in dimension {dim}; "
        "lower mixed_regression.clusters or raise mixed_regression.dim"
    )


def estimation_error(estimates: np.ndarray, truth: np.ndarray) -> float:
    """max_j ||estimate matched to j - theta*_j||, minimised over matchings.

    One estimate (a single global model) is matched to every true model. With m >= k
    estimates the matching is the bottleneck assignment: the smallest threshold under which
    every true model can get its own estimate (exact, via assignment feasibility checks).
    """
    dist = np.linalg.norm(estimates[:, None, :] - truth[None, :, :], axis=2)  # (m, k)
    if len(estimates) == 1:
        return float(dist.max())
    if len(estimates) < len(truth):
        raise ValueError(f"{len(estimates)} estimates cannot be matched to {len(truth)} models")
    for threshold in np.unique(dist):
        rows, cols = linear_sum_assignment(dist > threshold)
        if not (dist[rows, cols] > threshold).any():
            return float(threshold)
    raise AssertionError("unreachable: the largest distance always admits a matching")
