"""Mixed linear regression on a synthetic federation (Su, Xu, Yang, NeurIPS 2022 setting).

Client i belongs to one of k clusters z_i and holds n_i points
``y = <x, theta*_{z_i}> + noise`` with ``x ~ N(0, I_d)`` and noise ``N(0, sigma^2)``.
The k true models sit on a sphere, scaled so that their minimum pairwise distance equals
``separation``. Anchor clients (``Workload.anchor_ids``) hold ``anchors.size`` points and
cover the clusters round-robin.

With ``data.folder`` the clients' data are the folder's files instead (the device format),
and the truth is the folder's ``data.truth`` file, when there is one: ``models`` (k, dim)
and optionally ``labels`` (clients,). Without it no truth-based metric is computed, and the
run's key metric is the clients' mean squared error.

Everything is vectorised over a cohort: the points of all its clients are concatenated and
per-client sums use ``np.add.reduceat``, whose per-segment sums are sequential. Per-client
results therefore do not depend on which other clients share the cohort, which is what makes
runs bit-identical across cohort sizes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

from proto.wire import (
    ANCHOR_FIT, CENTRE, CLIENT_ID, ESTIMATE, N, NORMAL_EQUATIONS, SECOND_MOMENT, SECOND_MOMENT_PRODUCT, XX, XY, Y2,
    Y2XV, Y2XX,
)
from workloads.base import (
    CoarseStatistics,
    CohortData,
    ConfigField,
    DeviceFiles,
    KnownClusters,
    NormalEquations,
    Params,
    TrainSettings,
    Workload,
    SIZE_BUCKETS,
    non_negative,
    positive,
    size_bucket,
)
from workloads.device_files import (
    DeviceDataError, by_client, check_shape, client_id, folder_cohort, optional_cluster, read_npz,
)
from workloads.federation import BLOCK, STREAM_TRUTH, block_rng, draw_sizes, mean_size, num_nodes

# Fixed costs, calibrated on benchmarks/scale.py (PSS of all processes: 0.85 GiB at 10^4
# clients, where the data are negligible, and 2.30 GiB at 10^6).
RAY_WORKER_BYTES = 250e6  # a Ray worker with numpy and flwr imported
DRIVER_BYTES = 400e6  # the driver: Ray's head processes, Flower's engine, the server

# Local GD steps are capped per client (``train.step_cap``, default 0.5):
# eta_i = min(eta, step_cap / lambda_max(X_i'X_i / n_i)). The Hessian of the mean squared loss
# is 2 X'X/n, so a cap below 1 keeps every local step contractive.


BLOCKS_KEPT = 2  # generation blocks kept in memory (neighbouring cohorts share one)
CHUNK_POINTS = 65_536  # points per kernel pass: temporaries stay small whatever the cohort
EM_ITERATIONS = 200  # the maximum-likelihood reference's cap (it stops at a fixed point first)


@dataclass
class LinearCohort:
    """The concatenated points of a cohort of clients.

    Kernels walk the cohort in chunks of whole clients (``chunks``), so their temporaries
    are bounded by the chunk, not the cohort; per-client results do not depend on the
    chunking (each client's sums are sequential over its own points).
    """

    client_ids: np.ndarray  # (B,)
    num_examples: np.ndarray  # (B,)
    labels: np.ndarray | None  # (B,) true cluster of each client; None on real devices
    x: np.ndarray  # (P, d)
    y: np.ndarray  # (P,)
    starts: np.ndarray = field(init=False)  # (B,) first point of each client

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.num_examples)])[:-1].astype(np.int64)

    def chunks(self, points: int | None = None) -> list[tuple[int, int, int, int]]:
        """(first client, end client, first point, end point) of consecutive client chunks
        of about ``points`` (default ``CHUNK_POINTS``) points; a larger client is a chunk."""
        points = points or CHUNK_POINTS
        ends = self.starts + self.num_examples
        cuts = np.unique(np.searchsorted(ends, np.arange(points, ends[-1], points), side="right"))
        bounds = [0, *[int(c) for c in cuts if 0 < c < len(ends)], len(ends)]
        return [(a, b, int(self.starts[a]), int(ends[b - 1])) for a, b in zip(bounds[:-1], bounds[1:])]

    def owner(self, c0: int, c1: int) -> np.ndarray:
        """Client index (within the chunk) of each point of clients c0..c1."""
        return np.repeat(np.arange(c1 - c0), self.num_examples[c0:c1])

    def gram(self, c0: int, c1: int) -> np.ndarray:
        """(c1 - c0, d, d): X_i'X_i / n_i of clients c0..c1."""
        n = self.num_examples[c0:c1]
        return client_products(self.x, self.x, self.starts[c0:c1], n) / n[:, None, None]

    @cached_property
    def lambda_max(self) -> np.ndarray:
        """(B,): largest eigenvalue of X_i'X_i / n_i (for the step cap).

        X_i'X_i and X_i X_i' share their nonzero eigenvalues: clients with fewer points than
        dimensions (most of them) solve the smaller n x n problem.
        """
        out = np.empty(len(self.client_ids))
        d = self.x.shape[1]
        for n, members, rows in size_groups(self.starts, self.num_examples):
            xs = self.x[rows]  # (m, n, d)
            small = xs @ xs.transpose(0, 2, 1) if n < d else xs.transpose(0, 2, 1) @ xs
            out[members] = np.linalg.eigvalsh(small)[:, -1] / n
        return out


def size_groups(
    starts: np.ndarray, num_examples: np.ndarray, points: int | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(n, client positions, (m, n) point rows) for batches of clients holding n points each,
    at most ``points`` points per batch: equal-sized clients stack into one array, so
    per-client matrix products run as one batched matmul."""
    for n in np.unique(num_examples):
        members = np.flatnonzero(num_examples == n)
        per_batch = max(1, (points or CHUNK_POINTS) // int(n))
        for lo in range(0, len(members), per_batch):
            batch = members[lo:lo + per_batch]
            yield int(n), batch, starts[batch][:, None] + np.arange(n)


def client_products(a: np.ndarray, b: np.ndarray, starts: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
    """(B, da, db): A_i'B_i = sum over client i's points of a_p b_p', by batched matmul over
    clients of equal size (each client's product does not depend on the others)."""
    out = np.empty((len(starts), a.shape[1], b.shape[1]))
    for _, members, rows in size_groups(starts, num_examples):
        out[members] = a[rows].transpose(0, 2, 1) @ b[rows]
    return out


class MixedRegression(Workload, KnownClusters, CoarseStatistics, DeviceFiles, NormalEquations):
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

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """Phase 1 fits each anchor inside a k-dimensional subspace of the d features."""
        mr, anchors = scenario[cls.section], scenario["anchors"]
        k, errors = mr["clusters"], []
        if k > mr["dim"]:
            errors.append(
                ("mixed_regression.clusters",
                 f"{k} clusters exceed dim {mr['dim']}: the k models span at most dim directions")
            )
        if anchors["count"] < k:
            errors.append(
                ("anchors.count",
                 f"{anchors['count']} anchors cannot cover {k} clusters: Phase 1 of the clustered "
                 f"strategies needs at least one anchor per cluster (set anchors.count >= {k})")
            )
        if anchors["size"] < k:
            errors.append(
                ("anchors.size",
                 f"{anchors['size']} points per anchor cannot fit a {k}-dimensional model; "
                 f"expected >= {k} (recommended >= 10 k ln(k+1) = "
                 f"{int(np.ceil(10 * k * np.log(k + 1)))})")
            )
        return errors

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        super().__init__(scenario)
        fed, mr, anchors = scenario["federation"], scenario[self.section], scenario["anchors"]
        self.size_law = fed["size_law"]
        self.min_size, self.max_size = int(fed["min_size"]), int(fed["max_size"])
        self.zipf_exponent = float(fed["zipf_exponent"])
        self.single_point_fraction = float(fed["single_point_fraction"])
        self.dim, self.k = int(mr["dim"]), int(mr["clusters"])
        self.noise, self.separation = float(mr["noise"]), float(mr["separation"])
        weights = mr["cluster_weights"] or [1.0] * self.k
        self.cluster_weights = np.asarray(weights, dtype=float) / float(np.sum(weights))
        self.anchor_size = int(anchors["size"])
        self._blocks: dict[int, LinearCohort] = {}
        self._oracle: dict[str, Any] | None = None
        self._truth: dict[str, np.ndarray | None] | None = None  # a folder's truth file, read when first needed
        self.generated = self.data_folder is None and not self.deployed  # this class's generator made the data
        self.key_metric = self.key_metric_for(scenario)

    @classmethod
    def key_metric_for(cls, scenario: dict[str, dict[str, Any]]) -> str:
        """Without a truth to score against (a data folder or a deployment without
        ``data.truth``), the clients' mean squared error."""
        data = scenario.get("data", {})
        if (data.get("folder") or data.get("deployed")) and not data.get("truth"):
            return cls.loss_name
        return cls.key_metric

    @cached_property
    def true_models(self) -> np.ndarray | None:
        """(k, dim): generated, or the truth file of a data folder or a deployment (read on
        first use, so a device, which has none, never reads it); None without one: a
        deployment does not score against the generator's models, which its devices' data
        need not come from."""
        if self.generated:
            return true_models(self.seed, self.k, self.dim, self.separation)
        return None if self.truth_file is None else self.folder_truth()["models"]

    def folder_truth(self) -> dict[str, np.ndarray | None]:
        """``data.truth``: ``models`` (k, dim) and optional ``labels`` (clients,) in [0, k)."""
        if self._truth is None:
            path = self.truth_file
            f = read_npz(path, {"models": 2})
            check_shape(path, "models", f["models"], (self.k, self.dim))
            labels = f.get("labels")
            if labels is not None:
                check_shape(path, "labels", labels, (self.num_clients,))
                if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= self.k:
                    raise DeviceDataError(f"{path}: labels must be integers in [0, {self.k})")
                labels = labels.astype(np.int64)
            self._truth = {"models": f["models"].astype(np.float64), "labels": labels}
        return self._truth

    # ---- data -------------------------------------------------------------------------

    def _block(self, b: int) -> LinearCohort:
        """All ``BLOCK`` clients of generation block ``b`` (ids beyond the federation included,
        so that a client's data never depend on the federation size)."""
        if b not in self._blocks:
            if len(self._blocks) >= BLOCKS_KEPT:  # a cohort reads its blocks in order
                self._blocks.pop(next(iter(self._blocks)))
            rng = block_rng(self.seed, b)
            ids = np.arange(b * BLOCK, (b + 1) * BLOCK, dtype=np.int64)
            sizes = draw_sizes(
                rng, BLOCK, self.size_law, self.min_size, self.max_size, self.zipf_exponent
            )
            if self.single_point_fraction > 0:  # drawn only when asked: other data unchanged
                sizes[rng.random(BLOCK) < self.single_point_fraction] = 1
            labels = rng.choice(self.k, size=BLOCK, p=self.cluster_weights)
            is_anchor = self.is_anchor(ids)
            sizes[is_anchor] = self.anchor_size
            labels[is_anchor] = np.searchsorted(self.anchor_ids, ids[is_anchor]) % self.k  # round-robin
            x = rng.standard_normal((int(sizes.sum()), self.dim))
            noise = self.noise * rng.standard_normal(len(x))
            y = np.einsum("pd,pd->p", x, self.true_models[np.repeat(labels, sizes)]) + noise
            self._blocks[b] = LinearCohort(ids, sizes, labels, x, y)
        return self._blocks[b]

    def subset(self, data: CohortData, index: np.ndarray) -> LinearCohort:
        assert isinstance(data, LinearCohort)
        index = np.asarray(index)
        if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
            c0, c1 = int(index[0]), int(index[-1]) + 1  # a run of clients: views, no copies
            p0, p1 = int(data.starts[c0]), int(data.starts[c1 - 1] + data.num_examples[c1 - 1])
            labels = None if data.labels is None else data.labels[c0:c1]
            return LinearCohort(data.client_ids[c0:c1], data.num_examples[c0:c1],
                                labels, data.x[p0:p1], data.y[p0:p1])
        keep = np.zeros(len(data.client_ids), dtype=bool)
        keep[index] = True
        points = np.repeat(keep, data.num_examples)
        return LinearCohort(
            data.client_ids[index], data.num_examples[index],
            None if data.labels is None else data.labels[index], data.x[points], data.y[points],
        )

    device_format = (
        "one .npz per client: client_id (int scalar), x (n, dim) float, y (n,) float; "
        "optionally cluster (int scalar: the true cluster, written only by `umbel data export --labels`)"
    )

    def device_files(self, data: LinearCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        out = []
        for i, cid in enumerate(data.client_ids):
            p0 = int(data.starts[i])
            p1 = p0 + int(data.num_examples[i])
            out.append((int(cid), {
                "client_id": np.int64(cid), "x": data.x[p0:p1], "y": data.y[p0:p1],
            }))  # no true cluster: real devices have none (`umbel data export --labels` adds it)
        return out

    def read_device_files(self, files: list[Any]) -> LinearCohort:
        clients = []
        for path in files:
            f = read_npz(path, {"client_id": 0, "x": 2, "y": 1})
            cid, x, y = client_id(path, f, self.num_clients), f["x"], f["y"]
            if x.shape[1] != self.dim:
                raise DeviceDataError(f"{path}: x has {x.shape[1]} columns; this scenario's dim is {self.dim}")
            check_shape(path, "x", x, (None, self.dim))
            if len(x) == 0 or len(y) != len(x):
                raise DeviceDataError(f"{path}: x has {len(x)} rows and y {len(y)}; need the same number, "
                                      "at least one")
            check_shape(path, "y", y, (len(x),))
            label = optional_cluster(path, f, self.k)  # only in `umbel data export --labels` files
            clients.append((cid, x.astype(np.float64), y.astype(np.float64), label))
        clients = by_client([Path(p) for p in files], clients)
        ids = np.array([c[0] for c in clients], dtype=np.int64)
        labels = [c[3] for c in clients]
        return LinearCohort(
            ids, np.array([len(c[1]) for c in clients], dtype=np.int64),
            None if None in labels else np.array(labels, dtype=np.int64),
            np.ascontiguousarray(np.concatenate([c[1] for c in clients])),
            np.concatenate([c[2] for c in clients]),
        )

    def client_data(self, client_ids: np.ndarray) -> LinearCohort:
        client_ids = np.asarray(client_ids, dtype=np.int64)
        if len(client_ids) == 0:
            raise ValueError("a cohort needs at least one client")
        if (np.diff(client_ids) <= 0).any():
            raise ValueError("client ids must be strictly increasing")
        if client_ids.min() < 0 or client_ids.max() >= self.num_clients:
            raise ValueError(
                f"client ids must lie in [0, {self.num_clients}); got "
                f"[{client_ids.min()}, {client_ids.max()}]"
            )
        if self.data_folder is not None:  # the user's files; their labels from the truth file, if any
            data = folder_cohort(self, client_ids)
            if self.truth_file is not None and data.labels is None:
                labels = self.folder_truth()["labels"]
                data.labels = None if labels is None else labels[data.client_ids]
            return data
        parts_x, parts_y, sizes, labels = [], [], [], []
        blocks = client_ids // BLOCK
        for b in np.unique(blocks):
            blk = self._block(int(b))
            local = client_ids[blocks == b] - b * BLOCK
            keep = np.zeros(BLOCK, dtype=bool)
            keep[local] = True
            points = np.repeat(keep, blk.num_examples)  # ids are sorted: points stay in order
            parts_x.append(blk.x[points])
            parts_y.append(blk.y[points])
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

    def true_clusters(self, data: LinearCohort) -> np.ndarray | None:
        return data.labels

    def true_parameters(self) -> Params | None:
        """The k true models, stacked (for truth-started references and tests); None for a
        data folder without a truth file."""
        return None if self.true_models is None else {"w": self.true_models.copy()}

    memory_fields = ("federation.clients", "federation.cohort_size", "mixed_regression.dim")

    @classmethod
    def memory_estimate(cls, scenario: dict[str, dict[str, Any]], actors: int) -> float:
        """Data of every client (x, y and index arrays, held once: cohort files are shared
        by all workers through the page cache), plus per worker one cohort's working set
        (the points of the chunks in flight and their copies) and a Ray worker's base; the
        d x d matrices of the label oracle and of Phase 1's second moments."""
        fed, d = scenario["federation"], scenario[cls.section]["dim"]
        size = mean_size(fed["size_law"], fed["min_size"], fed["max_size"], fed["zipf_exponent"])
        points = fed["clients"] * size + scenario["anchors"]["count"] * scenario["anchors"]["size"]
        cohort_points = min(fed["clients"], fed["cohort_size"]) * size
        k = scenario[cls.section]["clusters"]
        data = points * (d + 2) * 8 + 2 * k * d * d * 8  # the server's label oracle: k Gram matrices
        working = cohort_points * (d + 4) * 8 * 2 + fed["cohort_size"] * (d + 8) * 8 * 4
        per_pass = min(fed["cohort_size"], max(1, 2**28 // (8 * d * d)))  # clients per pass (coarse_chunk)
        if any(s.startswith("clustered-") for s in scenario["run"]["strategies"]) and \
                scenario["clustered"]["phase1"] != "anchor-models":
            # Phase 1's d x d statistics: a pass of clients' per-client matrices and their
            # double-double sum per worker; the server's copies of the cohorts' sums
            working += (per_pass + 2) * d * d * 8
            data += 3 * 2 * d * d * 8
        if scenario["clustered"]["refine"] == "second-order" or any(
                t.get("refine") == "second-order" for t in scenario.get("strategy", {}).values()):
            # second-order replies: a pass of per-client d x d normal matrices, k double-double
            # sums per worker, and the server's copies of every cohort's
            working += (per_pass + 2 * k) * d * d * 8
            data += 2 * k * d * d * 8 * min(num_nodes(fed["clients"], fed["cohort_size"]), 64)
        return data + actors * (working + RAY_WORKER_BYTES) + DRIVER_BYTES

    @property
    def num_clusters(self) -> int:
        return self.k

    def local_loss(self, params: Params, data: CohortData) -> np.ndarray:
        return self.local_losses({"w": params["w"][None]}, data)[:, 0]

    def local_losses(self, models: Params, data: CohortData) -> np.ndarray:
        """(B, k): each client's mean squared error under each model, one pass over x."""
        assert isinstance(data, LinearCohort)
        w = models["w"].reshape(-1, self.dim)
        out = np.empty((len(data.client_ids), len(w)))
        for c0, c1, p0, p1 in data.chunks():
            residual = np.einsum("pd,kd->pk", data.x[p0:p1], w) - data.y[p0:p1, None]
            sums = np.add.reduceat(residual * residual, data.starts[c0:c1] - p0, axis=0)
            out[c0:c1] = sums / data.num_examples[c0:c1, None]
        return out

    def local_train(self, start: Params, data: CohortData, settings: TrainSettings) -> Params:
        assert isinstance(data, LinearCohort)
        w = np.array(start["w"], dtype=float, copy=True)  # (B, d)
        if settings.proximal_mu > 0:
            # FedProx, exact: argmin_w ||X w - y||^2/n + (mu/2)||w - w0||^2.
            mu, eye = settings.proximal_mu, np.eye(self.dim)
            for c0, c1, p0, p1 in data.chunks():
                x, y = data.x[p0:p1], data.y[p0:p1]
                moment = np.add.reduceat(x * y[:, None], data.starts[c0:c1] - p0, axis=0)
                rhs = 2.0 * moment / data.num_examples[c0:c1, None] + mu * w[c0:c1]
                w[c0:c1] = np.linalg.solve(2.0 * data.gram(c0, c1) + mu * eye, rhs[..., None])[..., 0]
            return {"w": w}
        step = np.full(len(data.client_ids), settings.lr) if settings.step_cap == 0 else \
            np.minimum(settings.lr, settings.step_cap / data.lambda_max)
        # Clients of equal size stack into (m, n, d): a step is two batched products per
        # client, X_i w_i and X_i' r_i, each independent of the other clients in the batch.
        for n, members, rows in size_groups(data.starts, data.num_examples):
            xs, ys, wm = data.x[rows], data.y[rows], w[members]
            for _ in range(settings.local_steps):
                residual = (xs @ wm[..., None])[..., 0] - ys
                wm -= step[members, None] * (2.0 / n) * (xs.transpose(0, 2, 1) @ residual[..., None])[..., 0]
            w[members] = wm
        return {"w": w}

    def normal_equations(self, data: CohortData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each client's X'X/n (B, d, d), X'y/n (B, d) and y'y/n (B,): its mean squared error
        is w'(X'X/n)w - 2(X'y/n)'w + y'y/n."""
        assert isinstance(data, LinearCohort)
        n = data.num_examples.astype(np.float64)
        gram = client_products(data.x, data.x, data.starts, data.num_examples) / n[:, None, None]
        return (gram, np.add.reduceat(data.x * data.y[:, None], data.starts, axis=0) / n[:, None],
                np.add.reduceat(data.y * data.y, data.starts) / n)

    # ---- Phase 1 statistics (anchors send statistics, never raw data) ----------------------

    coarse_steps = (NORMAL_EQUATIONS, SECOND_MOMENT, SECOND_MOMENT_PRODUCT, ANCHOR_FIT)

    def coarse_chunk(self) -> int:
        """Clients per pass: their d x d statistics stay under about 256 MB."""
        return max(1, min(2048, 2**28 // (8 * self.dim * self.dim)))

    def coarse_statistics(self, step: str, request: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Steps of the coarse estimate:

        - ``normal-equations``: per client X'X (d x d), X'y and n (to sum: a global least
          squares fit);
        - ``second-moment``: per client sum of y^2 x x' (d x d) and of y^2, and n (to sum);
        - ``second-moment-product``: the same moment times a basis V (d x k): y^2 x (x'V);
          with ``request["centre"]`` (a model) both use the residual y - <x, centre> for y;
        - ``anchor-fit``: each anchor's least squares inside the subspace U (d x k), returned
          as U beta (a row per anchor). ``request["descent-steps"] > 0`` reaches it by that many
          gradient steps on the anchor's second moment of residuals from beta = 0 instead
          (moment descent); 0 solves it exactly.
        Requests may restrict the moments to anchors (``request["anchors-only"] = 1``).
        """
        assert isinstance(data, LinearCohort)
        is_anchor = self.is_anchor(data.client_ids)
        if step in (NORMAL_EQUATIONS, SECOND_MOMENT, SECOND_MOMENT_PRODUCT) and _scalar(request, "anchors-only"):
            data = self.subset(data, np.flatnonzero(is_anchor))  # only the anchors' moments: drop the rest first
        if step == NORMAL_EQUATIONS:
            return {XX: client_products(data.x, data.x, data.starts, data.num_examples),
                    XY: np.add.reduceat(data.x * data.y[:, None], data.starts, axis=0),
                    N: data.num_examples.astype(np.float64), CLIENT_ID: data.client_ids}
        if step in (SECOND_MOMENT, SECOND_MOMENT_PRODUCT):
            y = data.y if CENTRE not in request else \
                data.y - np.einsum("pd,d->p", data.x, np.asarray(request[CENTRE], np.float64))  # row by row
            y2 = y**2
            out = {Y2: np.add.reduceat(y2, data.starts), N: data.num_examples.astype(np.float64)}
            z = data.x * np.abs(y)[:, None]  # y^2 x x' = z z'
            other = z if step == SECOND_MOMENT else z @ request["basis"]  # (P, d) or (P, k)
            name = Y2XX if step == SECOND_MOMENT else Y2XV
            out[name] = client_products(z, other, data.starts, data.num_examples)
            out[CLIENT_ID] = data.client_ids
            return out
        if step == ANCHOR_FIT:
            basis = request["basis"]
            steps = int(_scalar(request, "descent-steps"))
            estimates = []
            for i in np.flatnonzero(is_anchor):
                sl = slice(data.starts[i], data.starts[i] + data.num_examples[i])
                z, y = data.x[sl] @ basis, data.y[sl]
                if steps == 0:
                    beta = np.linalg.lstsq(z, y, rcond=None)[0]
                else:
                    beta = np.zeros(basis.shape[1])
                    gram = z.T @ z / len(y)
                    step_size = 0.5 / np.linalg.eigvalsh(gram)[-1]
                    for _ in range(steps):  # descend the residual second moment E[(y - z'b)^2]
                        beta -= step_size * 2 * (gram @ beta - z.T @ y / len(y))
                estimates.append(basis @ beta)
            ids = data.client_ids[is_anchor]
            return {CLIENT_ID: ids, ESTIMATE: np.array(estimates).reshape(len(ids), self.dim)}
        raise ValueError(f"mixed regression has no coarse-estimate step {step!r}")

    # ---- central metrics ----------------------------------------------------------------

    def central_metrics(
        self, models: Params, confusion: np.ndarray | None = None
    ) -> dict[str, float]:
        """Distances to the true models (none without a truth): ``estimation_error`` (the
        worst matched model), ``nearest_error`` (IFCA's: the mean over the learned models of
        the distance to the nearest true one), the label oracle's error, misclustering."""
        if self.true_models is None:
            return {}
        estimates = models["w"].reshape(-1, self.dim)
        error, match = best_matching(estimates, self.true_models)
        out = {"estimation_error": error, "nearest_error": nearest_error(estimates, self.true_models)}
        oracle = self.oracle()
        if oracle is not None:
            out["oracle_error"] = oracle["error"]
        if confusion is not None and len(estimates) == self.k and confusion.sum() > 0:
            # confusion[j, l, b]: clients of true cluster l and size bucket b that chose j
            total = confusion.sum(axis=(0, 1))
            wrong = total - sum(confusion[j, match[j]] for j in range(self.k))
            out["misclustering_rate"] = float(wrong.sum() / total.sum())
            for name, w, t in zip(SIZE_BUCKETS, wrong, total):
                out[f"misclustering_{name}"] = float(w / t) if t else None
        return out

    def oracle(self) -> dict[str, Any] | None:
        """The label oracle (per-cluster least squares with the true labels, over all clients)
        and the argmin rule evaluated at the true models (the Bayes-like misclustering per
        size bucket). One pass over the federation's data, cached; None when the clients'
        true clusters are unknown (a data folder whose truth file has no labels)."""
        if not self.generated and (self.data_folder is None or self.truth_file is None
                                   or self.folder_truth()["labels"] is None):
            return None  # the server holds no data (a deployment) or knows no labels
        if self._oracle is None:
            gram = np.zeros((self.k, self.dim, self.dim))
            moment = np.zeros((self.k, self.dim))
            wrong, total = np.zeros(len(SIZE_BUCKETS)), np.zeros(len(SIZE_BUCKETS))
            truth = {"w": self.true_models}
            for lo in range(0, self.num_clients, BLOCK):
                data = self.client_data(np.arange(lo, min(lo + BLOCK, self.num_clients)))
                point_label = np.repeat(data.labels, data.num_examples)
                for j in range(self.k):
                    xj = data.x[point_label == j]
                    gram[j] += xj.T @ xj
                    moment[j] += xj.T @ data.y[point_label == j]
                losses = np.stack([self.local_loss({"w": t}, data) for t in truth["w"]], axis=1)
                bucket = size_bucket(data.num_examples)
                miss = losses.argmin(axis=1) != data.labels
                wrong += np.bincount(bucket, weights=miss, minlength=len(SIZE_BUCKETS))
                total += np.bincount(bucket, minlength=len(SIZE_BUCKETS))
            models = np.linalg.solve(gram, moment[..., None])[..., 0]
            self._oracle = {
                "models": models,
                "error": best_matching(models, self.true_models)[0],
                "bayes_misclustering": {
                    name: (w / t if t else None) for name, w, t in zip(SIZE_BUCKETS, wrong, total)
                },
            }
        return self._oracle

    def maximum_likelihood(self, iterations: int = EM_ITERATIONS) -> np.ndarray:
        """The label-free reference beside the label oracle: EM for the mixture of k linear
        regressions over the whole federation (each client's points share one cluster;
        noise variance and cluster weights estimated), started at the true models, to a
        fixed point. No estimator without labels is expected to beat it; (k, d)."""
        if self.true_models is None:
            raise ValueError("the maximum-likelihood reference starts at the true models; this federation has none")
        data = self.client_data(np.arange(self.num_clients))
        models = self.true_models.copy()
        n = data.num_examples.astype(np.float64)
        # the noise of the start: each point's smallest squared residual under the true models
        variance = float(np.mean(np.min((data.x @ models.T - data.y[:, None]) ** 2, axis=1)))
        weights = np.full(self.k, 1 / self.k)
        for _ in range(iterations):
            sse = self.local_losses({"w": models}, data) * n[:, None]  # (clients, k)
            log_post = np.log(weights) - sse / (2 * variance)
            resp = np.exp(log_post - log_post.max(axis=1, keepdims=True))
            resp /= resp.sum(axis=1, keepdims=True)
            point_resp = np.repeat(resp, data.num_examples, axis=0)
            previous = models.copy()
            for j in range(self.k):
                weighted = data.x * point_resp[:, j:j + 1]
                models[j] = np.linalg.solve(weighted.T @ data.x, weighted.T @ data.y)
            variance = float((point_resp * (data.x @ models.T - data.y[:, None]) ** 2).sum() / n.sum())
            weights = resp.mean(axis=0)
            if np.abs(models - previous).max() < 1e-12:
                break
        return models


def _scalar(request: Params, key: str, default: float = 0) -> float:
    """A scalar carried as an array in a request (it may arrive 0-d or 1-d)."""
    return float(np.asarray(request[key]).reshape(-1)[0]) if key in request else default


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


def best_matching(estimates: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    """(max_j ||estimate matched to j - theta*_j||, minimised over matchings; the matching).

    ``match[i]`` is the true model that estimate i stands for. One estimate (a single global
    model) stands for every true model. With m >= k estimates the matching is the bottleneck
    assignment: the smallest threshold under which every true model gets its own estimate
    (exact, via assignment feasibility checks).
    """
    dist = np.linalg.norm(estimates[:, None, :] - truth[None, :, :], axis=2)  # (m, k)
    if len(estimates) == 1:
        return float(dist.max()), np.zeros(1, dtype=np.int64)
    if len(estimates) < len(truth):
        raise ValueError(f"{len(estimates)} estimates cannot be matched to {len(truth)} models")
    for threshold in np.unique(dist):
        rows, cols = linear_sum_assignment(dist > threshold)
        if not (dist[rows, cols] > threshold).any():
            match = np.full(len(estimates), -1, dtype=np.int64)
            match[rows] = cols
            return float(threshold), match
    raise AssertionError("unreachable: the largest distance always admits a matching")


def nearest_error(estimates: np.ndarray, truth: np.ndarray) -> float:
    """IFCA's accuracy measure: the mean over the estimates of the distance to the nearest
    true model (Ghosh et al. 2020, synthetic experiments)."""
    dist = np.linalg.norm(estimates[:, None, :] - truth[None, :, :], axis=2)
    return float(dist.min(axis=1).mean())


def estimation_error(estimates: np.ndarray, truth: np.ndarray) -> float:
    return best_matching(estimates, truth)[0]
