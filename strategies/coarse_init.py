"""Phase 1 of Su, Xu, Yang (2022): coarse estimates of the k models from anchor clients.

Both initialisers talk to the federation only through an ``exchange`` callable:
``exchange(step, request, reduce)`` sends a workload step (``coarse_statistics``) to every
cohort and returns the statistics summed over clients (``reduce="sum"``) or the anchors' rows
(``reduce="rows"``, sorted by client id). The Flower strategy implements it with messages;
the in-process reference calls the cohorts directly. Anchors send statistics, never data.

Status against the paper (see README): the abstract (verified) says Phase 1 runs "moment
descent" on anchor clients with ~k points each; the algorithm box was not available. Both
routines here are reconstructions:

- ``SubspaceKMeans`` (default, the spec's design): the second-moment matrix
  E[y^2 x x'] - E[y^2] I = 2 sum_j p_j theta_j theta_j' (Gaussian x) from all clients' sums,
  its top-k eigenvectors U, each anchor's least squares inside U, then k-means++ with
  restarts on the anchors' estimates;
- ``MomentDescent``: the same structure with iterative moment steps only: the subspace by
  federated subspace iteration (clients send d x k products, never d x d matrices), and each
  anchor descending its residual second moment E[(y - <U'x, b>)^2] from b = 0.

For non-linear models (neural networks) there are no moments to exploit; ``AnchorModels``
keeps the structure of the paper's Phase 1 in the only form that carries over: each anchor
trains from one common start (the workload's ``anchor-train`` step, any trainable workload
answers it); k-means++ groups the anchors by the *direction* of their updates (unit vectors
of model - start, less their mean, renormalised: cosine geometry, as in clustered FL by
update similarity, without the direction every anchor shares), and each coarse model is the
mean of the anchor models of its group (their FedAvg). Pilots (README): raw distances fail,
as anchors of the sharpest dynamics take much longer steps and end up as singletons; plain
directions fail on small anchors, whose shared direction dominates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from proto.exact_sum import dd_add, dd_value
from proto.wire import (
    ANCHOR_FIT, ANCHOR_TRAIN, CLIENT_ID, ESTIMATE, N, REDUCE_ROWS, REDUCE_SUM, SECOND_MOMENT, SECOND_MOMENT_PRODUCT, Y2, Y2XV, Y2XX,
    Params,
)
from strategies.clustered import kmeans

Exchange = Callable[[str, Params, str], dict[str, np.ndarray]]


class CoarseInitError(ValueError):
    """Phase 1 cannot produce k estimates; the message says what to change."""


@dataclass
class CoarseResult:
    centres: np.ndarray  # (k, P): flattened models
    basis: np.ndarray | None  # (d, k) subspace (None: Phase 1 without one)
    anchors: int
    warnings: list[str] = field(default_factory=list)


class CoarseInit(ABC):
    """A Phase-1 routine: k coarse models from the federation, through ``exchange``."""

    name: str
    steps: tuple[str, ...]  # the workload steps it sends (``proto.wire``)

    def __init__(self, k: int, dim: int, seed: int, restarts: int = 10) -> None:
        if k > dim:
            raise CoarseInitError(f"{k} clusters exceed the dimension {dim}: the span has rank <= {dim}")
        self.k, self.dim, self.seed, self.restarts = k, dim, seed, restarts

    @abstractmethod
    def estimate(self, exchange: Exchange) -> CoarseResult:
        """The k coarse models (flattened rows) and what Phase 1 learnt on the way."""

    def _check_anchors(self, estimates: np.ndarray) -> None:
        if len(estimates) < self.k:
            raise CoarseInitError(
                f"{len(estimates)} anchor estimates for {self.k} clusters: Phase 1 needs at "
                f"least one healthy anchor per cluster (anchors.count >= {self.k}, and that many "
                "anchors able to reply)"
            )


class MomentInit(CoarseInit):
    """Linear models: a subspace from second moments, anchors' fits inside it, k-means++."""

    def __init__(
        self, k: int, dim: int, seed: int, restarts: int = 10, anchors_only: bool = False
    ) -> None:
        super().__init__(k, dim, seed, restarts)
        self.anchors_only = anchors_only

    @abstractmethod
    def subspace(self, exchange: Exchange) -> np.ndarray:
        """(d, k) orthonormal basis of the estimated span of the k models."""

    def anchor_request(self, basis: np.ndarray) -> Params:
        return {"basis": basis}

    def estimate(self, exchange: Exchange) -> CoarseResult:
        basis = self.subspace(exchange)
        estimates = exchange(ANCHOR_FIT, self.anchor_request(basis), REDUCE_ROWS)[ESTIMATE]
        self._check_anchors(estimates)
        centres = kmeans(estimates, self.k, self.restarts, self.seed)
        return CoarseResult(centres, basis, len(estimates), coverage_warnings(estimates, centres))

    def _moment_matrix_request(self) -> Params:
        """Whose second moments estimate the subspace: every client (default) or anchors."""
        return {"anchors-only": np.array(int(self.anchors_only))}


class SubspaceKMeans(MomentInit):
    name = "subspace-kmeans"
    steps = (SECOND_MOMENT, ANCHOR_FIT)

    def subspace(self, exchange: Exchange) -> np.ndarray:
        stats = exchange(SECOND_MOMENT, self._moment_matrix_request(), REDUCE_SUM)
        return top_subspace(stats[Y2XX], stats[Y2], stats[N], self.k)


class MomentDescent(MomentInit):
    name = "moment-descent"
    steps = (SECOND_MOMENT_PRODUCT, ANCHOR_FIT)

    def __init__(self, k: int, dim: int, seed: int, restarts: int = 10,
                 anchors_only: bool = False, iterations: int = 50, descent_steps: int = 200):
        super().__init__(k, dim, seed, restarts, anchors_only)
        self.iterations, self.descent_steps = iterations, descent_steps

    def subspace(self, exchange: Exchange) -> np.ndarray:
        """Subspace iteration on the second-moment operator from a seeded random start."""
        rng = np.random.default_rng(self.seed)
        basis, _ = np.linalg.qr(rng.standard_normal((self.dim, self.k)))
        for _ in range(self.iterations):
            stats = exchange(
                SECOND_MOMENT_PRODUCT, {"basis": basis, **self._moment_matrix_request()}, REDUCE_SUM
            )
            n = float(np.sum(stats[N]))  # scalars may travel as 1-element arrays
            new, _ = np.linalg.qr(stats[Y2XV] / n - (float(np.sum(stats[Y2])) / n) * basis)
            if subspace_distance(basis, new) < 1e-9:
                return new
            basis = new
        return basis

    def anchor_request(self, basis: np.ndarray) -> Params:
        return {"basis": basis, "descent-steps": np.array(self.descent_steps)}


class AnchorModels(CoarseInit):
    """Anchors train from a common start; k-means++ (with restarts) on their centred update
    directions; each coarse model is the mean of its group's anchor models."""

    name = "anchor-models"
    steps = (ANCHOR_TRAIN,)

    def __init__(self, k: int, dim: int, seed: int, restarts: int = 10, *,
                 start: np.ndarray, steps: int, lr: float) -> None:
        super().__init__(k, dim, seed, restarts)
        self.start, self.steps, self.lr = np.asarray(start, np.float64).ravel(), steps, lr

    def estimate(self, exchange: Exchange) -> CoarseResult:
        request = {"start": self.start, "steps": np.array(self.steps), "lr": np.array(self.lr)}
        estimates = exchange(ANCHOR_TRAIN, request, REDUCE_ROWS)[ESTIMATE]
        self._check_anchors(estimates)
        updates = estimates - self.start
        norms = np.linalg.norm(updates, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise CoarseInitError("an anchor model equals the common start: anchors did not train "
                                  "(check clustered.anchor_steps and train.lr)")
        directions = updates / norms
        directions = directions - directions.mean(axis=0)
        spread = np.linalg.norm(directions, axis=1, keepdims=True)
        directions = directions / np.where(spread > 0, spread, 1.0)
        centres = kmeans(directions, self.k, self.restarts, self.seed)
        label = np.argmin(((directions[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        models = np.stack([estimates[label == j].mean(0) if np.any(label == j) else self.start
                           for j in range(self.k)])
        return CoarseResult(models, None, len(estimates), coverage_warnings(directions, centres))


def reduce_coarse(parts: list[dict[str, np.ndarray]], reduce: str) -> dict[str, np.ndarray]:
    """Combine the cohorts' answers to a Phase-1 step: add double-double sums, or
    concatenate anchor rows in client-id order."""
    if not parts:
        raise CoarseInitError("no node answered this Phase-1 step")
    if reduce == REDUCE_ROWS:
        ids = np.concatenate([p[CLIENT_ID] for p in parts])
        order = np.argsort(ids, kind="stable")
        return {n: np.concatenate([p[n] for p in parts])[order] for n in parts[0] if n != CLIENT_ID}
    out = {}
    for name in sorted({n.rsplit(".", 1)[0] for n in parts[0] if n.endswith(".hi")}):
        total = (parts[0][f"{name}.hi"], parts[0][f"{name}.lo"])
        for p in parts[1:]:
            total = dd_add(total, (p[f"{name}.hi"], p[f"{name}.lo"]))
        out[name] = dd_value(total)
    return out


def top_subspace(y2xx: np.ndarray, y2: np.ndarray, n: np.ndarray, k: int) -> np.ndarray:
    """Top-k eigenvectors of E[y^2 x x'] - E[y^2] I (whose span is that of the k models)."""
    d = y2xx.shape[0]
    n = float(np.sum(n))  # scalars may travel as 1-element arrays
    moment = y2xx / n - (float(np.sum(y2)) / n) * np.eye(d)
    _, vectors = np.linalg.eigh((moment + moment.T) / 2)
    return vectors[:, ::-1][:, :k]


def subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Spectral norm of the difference of the two projections."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def coverage_warnings(estimates: np.ndarray, centres: np.ndarray) -> list[str]:
    """Warn when the anchors do not seem to cover k distinct clusters: two centres closer
    than twice the spread of the estimates around their centres, or than a quarter of the
    typical centre distance (one true cluster split in two)."""
    label = np.argmin(((estimates[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    spread = np.sqrt(((estimates - centres[label]) ** 2).sum(-1)).max()
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]]
    warnings = []
    if gaps and (min(gaps) < 2 * spread or min(gaps) < np.median(gaps) / 4):
        warnings.append(
            f"anchor estimates do not separate into {len(centres)} groups (closest centres "
            f"{min(gaps):.3g} apart, spread {spread:.3g}): anchors may not cover every cluster; "
            "raise anchors.count or anchors.size"
        )
    if np.bincount(label, minlength=len(centres)).min() == 0:
        warnings.append("a k-means centre has no anchor: some cluster has no anchor estimate")
    return warnings
