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
    ANCHOR_FIT, ANCHOR_TRAIN, CENTRE, CLIENT_ID, ESTIMATE, N, NORMAL_EQUATIONS, REDUCE_ROWS, REDUCE_SUM, SECOND_MOMENT,
    SECOND_MOMENT_PRODUCT, XX, XY, Y2, Y2XV, Y2XX, Params,
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
    centre: np.ndarray | None = None  # the global least-squares fit (residual moments)


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
    """Linear models: a subspace from second moments, anchors' fits inside it, k-means++.

    ``residual`` (default): the moments are of the residuals after a global least-squares
    fit (one extra exchange: the summed normal equations). E[r^2 x x'] - E[r^2] I is then
    2 sum_j p_j delta_j delta_j', delta_j = theta_j - the fit, of rank k - 1; the subspace is
    the fit's direction plus its top k - 1 eigenvectors. This removes what every cluster
    shares from the moment, whose sampling noise scales with E[y^2]: at d = 1000 with
    100-point clients (IFCA's benchmark) the raw moment buries the clusters' directions in
    that noise, the residual one keeps them above it (README, Phase 1).
    """

    def __init__(
        self, k: int, dim: int, seed: int, restarts: int = 10, anchors_only: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__(k, dim, seed, restarts)
        self.anchors_only, self.residual = anchors_only, residual
        self.spectrum: np.ndarray | None = None  # the moment's top eigenvalues (for the warnings)

    @abstractmethod
    def subspace(self, exchange: Exchange, centre: np.ndarray | None) -> np.ndarray:
        """(d, k) orthonormal basis of the estimated span of the k models (with ``centre``:
        its direction and the top k - 1 directions of the residual moment)."""

    def anchor_request(self, basis: np.ndarray) -> Params:
        return {"basis": basis}

    def estimate(self, exchange: Exchange) -> CoarseResult:
        centre = self.global_fit(exchange) if self.residual else None
        basis = self.subspace(exchange, centre)
        estimates = exchange(ANCHOR_FIT, self.anchor_request(basis), REDUCE_ROWS)[ESTIMATE]
        self._check_anchors(estimates)
        centres = kmeans(estimates, self.k, self.restarts, self.seed)
        warnings = coverage_warnings(estimates, centres, self.spectrum, self.k - 1 if self.residual else self.k)
        return CoarseResult(centres, basis, len(estimates), warnings, centre)

    def global_fit(self, exchange: Exchange) -> np.ndarray:
        """One least-squares model over every client's data (from their summed normal
        equations; a tiny ridge keeps it defined with fewer points than dimensions)."""
        stats = exchange(NORMAL_EQUATIONS, self._moment_matrix_request(), REDUCE_SUM)
        gram = stats[XX] / max(float(np.sum(stats[N])), 1.0)
        ridge = 1e-9 * max(float(np.trace(gram)) / len(gram), np.finfo(float).tiny)
        return np.linalg.solve(gram + ridge * np.eye(len(gram)), stats[XY] / max(float(np.sum(stats[N])), 1.0))

    def _moment_matrix_request(self, centre: np.ndarray | None = None) -> Params:
        """Whose second moments estimate the subspace: every client (default) or anchors;
        of the residuals from ``centre`` when given."""
        request = {"anchors-only": np.array(int(self.anchors_only))}
        return request if centre is None else {**request, CENTRE: centre}


class SubspaceKMeans(MomentInit):
    name = "subspace-kmeans"
    steps = (NORMAL_EQUATIONS, SECOND_MOMENT, ANCHOR_FIT)

    def subspace(self, exchange: Exchange, centre: np.ndarray | None) -> np.ndarray:
        stats = exchange(SECOND_MOMENT, self._moment_matrix_request(centre), REDUCE_SUM)
        vectors, self.spectrum = top_subspace(stats[Y2XX], stats[Y2], stats[N], self.k, spectrum=True)
        return vectors if centre is None else with_centre(centre, vectors[:, :self.k - 1])


class MomentDescent(MomentInit):
    name = "moment-descent"
    steps = (NORMAL_EQUATIONS, SECOND_MOMENT_PRODUCT, ANCHOR_FIT)

    def __init__(self, k: int, dim: int, seed: int, restarts: int = 10,
                 anchors_only: bool = False, residual: bool = True, iterations: int = 50,
                 descent_steps: int = 200):
        super().__init__(k, dim, seed, restarts, anchors_only, residual)
        self.iterations, self.descent_steps = iterations, descent_steps

    def subspace(self, exchange: Exchange, centre: np.ndarray | None) -> np.ndarray:
        """Subspace iteration on the second-moment operator from a seeded random start
        (clients send d x k products, never d x d matrices); with ``centre``, k - 1
        directions of the residual moment beside the centre's."""
        width = self.k if centre is None else self.k - 1
        if width == 0:
            return with_centre(centre, np.empty((self.dim, 0)))
        rng = np.random.default_rng(self.seed)
        basis, _ = np.linalg.qr(rng.standard_normal((self.dim, width)))
        request = self._moment_matrix_request(centre)
        for _ in range(self.iterations):
            stats = exchange(SECOND_MOMENT_PRODUCT, {"basis": basis, **request}, REDUCE_SUM)
            n = float(np.sum(stats[N]))  # scalars may travel as 1-element arrays
            new, _ = np.linalg.qr(stats[Y2XV] / n - (float(np.sum(stats[Y2])) / n) * basis)
            if subspace_distance(basis, new) < 1e-9:
                basis = new
                break
            basis = new
        return basis if centre is None else with_centre(centre, basis)

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
        warnings = coverage_warnings(directions, centres, larger=ANCHOR_STEPS_ADVICE)
        return CoarseResult(models, None, len(estimates), warnings)


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


def top_subspace(y2xx: np.ndarray, y2: np.ndarray, n: np.ndarray, k: int, spectrum: bool = False):
    """Top-k eigenvectors of E[y^2 x x'] - E[y^2] I (whose span is that of the k models);
    with ``spectrum``, also its top k + 1 eigenvalues."""
    d = y2xx.shape[0]
    n = float(np.sum(n))  # scalars may travel as 1-element arrays
    moment = y2xx / n - (float(np.sum(y2)) / n) * np.eye(d)
    values, vectors = np.linalg.eigh((moment + moment.T) / 2)
    top = vectors[:, ::-1][:, :k]
    return (top, values[::-1][:k + 1]) if spectrum else top


def with_centre(centre: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the centre's direction and ``vectors`` (d x (m + 1))."""
    basis, _ = np.linalg.qr(np.column_stack([centre, vectors]))
    return basis


def subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Spectral norm of the difference of the two projections."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


SIGNAL_GAP = 2.0  # the moment's last signal eigenvalue over the next: below this, noise


ANCHOR_SIZE_ADVICE = "anchors.size (points per anchor, to fit inside the subspace)"
ANCHOR_STEPS_ADVICE = "clustered.anchor_steps (longer anchor training moves each anchor towards its own cluster)"


def coverage_warnings(estimates: np.ndarray, centres: np.ndarray, spectrum: np.ndarray | None = None,
                      signal: int | None = None, larger: str = ANCHOR_SIZE_ADVICE) -> list[str]:
    """Warn when the anchors do not seem to cover k distinct clusters: two centres closer
    than twice the RMS spread of the estimates around their centres, or than a quarter of the
    typical centre distance (one true cluster split in two). The advice follows the cause:
    when the moment's ``signal``-th eigenvalue (of ``spectrum``, its top ones) does not stand
    above the next, the subspace is noise and no anchor can help; otherwise (or without a
    spectrum: anchor models, moment descent) the anchors are too few to cover every cluster
    or too small (``larger``: the setting that makes each anchor's estimate better)."""
    label = np.argmin(((estimates[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    spread = np.sqrt(((estimates - centres[label]) ** 2).sum(-1).mean())  # RMS: one stray anchor is not a cluster
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]]
    warnings = []
    if gaps and (min(gaps) < 2 * spread or min(gaps) < np.median(gaps) / 4):
        found = (f"anchor estimates do not separate into {len(centres)} groups (closest centres "
                 f"{min(gaps):.3g} apart, spread {spread:.3g})")
        weak = spectrum is not None and signal and len(spectrum) > signal and \
            not spectrum[signal - 1] > SIGNAL_GAP * max(spectrum[signal], 0.0)
        if weak:
            residual = signal == len(centres) - 1  # residual moments keep k - 1 directions besides the fit
            remedies = ([] if residual else ['clustered.moments = "residual"']) + [
                'moments from every client (clustered.moments_from = "all")', "more points per dimension",
                "or fewer clusters"]
            warnings.append(
                f"{found}: the second moments do not lift the clusters' directions above sampling noise "
                f"(eigenvalue {signal} is {spectrum[signal - 1]:.3g}, the next {spectrum[signal]:.3g}), so more or "
                f"larger anchors cannot help; what can: {', '.join(remedies)}")
        else:
            cause = "the anchors may not cover every cluster" if spectrum is None else \
                "the subspace is clear of noise, so the anchors are the limit"
            warnings.append(
                f"{found}: {cause}: raise anchors.count (random anchors miss a cluster often: with k clusters "
                f"and m anchors about k(1 - 1/k)^m of the time) or {larger}")
    if np.bincount(label, minlength=len(centres)).min() == 0:
        warnings.append("a k-means centre has no anchor: some cluster has no anchor estimate")
    return warnings
