"""Aggregation strategies: pure numpy cores under thin Flower ``Strategy`` classes.

- ``fedavg`` / ``fedprox``: Flower's own FedAvg/FedProx on one global model (cohort-aware);
- ``clustered-fedavg`` / ``clustered-fedprox``: Su, Xu, Yang (NeurIPS 2022): Phase 1 coarse
  estimates from anchors, then min-loss cluster choice and FedAvg or FedProx refinement;
- ``ifca``: Ghosh et al. (2020): the same alternation from the initial models handed in;
- ``oracle``: clients use their true cluster (synthetic data): the floor of the alternation;
- ``fedmedian``, ``fedtrimmedavg``, ``krum``, ``multikrum``, ``fedavg-clip``: Flower's robust
  aggregators and norm clipping on one global model (``strategies.robust``);
- ``data-union``: clients upload small datasets; the server trains on their union
  (``strategies.data_union``; the workload provides the trainer).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from strategies.aggregation import coordinate_median, krum, trimmed_mean
from strategies.clustered_fl import ClusteredStrategy
from strategies.coarse_init import AnchorModels, CoarseInit, MomentDescent, SubspaceKMeans
from strategies.data_union import DataUnion, UploadTrainer
from strategies.fedavg import CohortFedAvg, CohortFedProx
from strategies.result import ReportingStrategy, RoundResult
from strategies.robust import ROBUST

SINGLE_MODEL = ("fedavg", "fedprox", *ROBUST, "data-union")
K_MODEL = ("clustered-fedavg", "clustered-fedprox", "ifca", "oracle")
STRATEGIES = SINGLE_MODEL + K_MODEL
PHASE1 = {init.name: init for init in (SubspaceKMeans, MomentDescent, AnchorModels)}


def runs_phase1(name: str) -> bool:
    """Whether the strategy starts with Phase 1 (coarse estimates from anchors)."""
    return name.startswith("clustered-")


def k_model_roles(name: str, proximal_mu: float) -> tuple[str, float]:
    """(how clients pick their model, the FedProx weight of the refinement; 0 = FedAvg)."""
    selection = "true-label" if name == "oracle" else "min-loss"
    return selection, proximal_mu if name == "clustered-fedprox" else 0.0


def coarse_init_for(
    name: str, k: int, dim: int, seed: int, clustered: dict[str, Any], phase1: str | None = None,
    *, start: np.ndarray | None = None, lr: float = 0.0,
) -> CoarseInit | None:
    """Phase 1 of a k-model strategy (None for IFCA and the oracle); ``phase1`` overrides
    ``clustered.phase1``. ``start`` (the flattened initial model) and ``lr`` (the local step
    size) serve ``anchor-models``."""
    if not runs_phase1(name):
        return None
    init_cls = PHASE1[phase1 or clustered.get("phase1", "subspace-kmeans")]
    if init_cls is AnchorModels:
        if start is None:
            raise ValueError("anchor-models needs the common start model")
        return AnchorModels(k, dim, seed, restarts=clustered.get("kmeans_restarts", 10), start=start,
                            steps=clustered.get("anchor_steps", 100), lr=lr)
    return init_cls(
        k, dim, seed, restarts=clustered.get("kmeans_restarts", 10),
        anchors_only=clustered.get("moments_from", "all") == "anchors",
        residual=clustered.get("moments", "residual") == "residual",
    )


def build_strategy(
    name: str,
    num_nodes: int,
    *,
    proximal_mu: float,
    k: int = 1,
    dim: int = 0,
    seed: int = 0,
    clustered: dict[str, Any] | None = None,
    timeout: float = 600.0,
    start: np.ndarray | None = None,
    lr: float = 0.0,
    robust: dict[str, Any] | None = None,
    uploads: UploadTrainer | None = None,
) -> ReportingStrategy:
    """A strategy that sends to, and waits for, all ``num_nodes`` cohorts every round.

    ``clustered`` holds the scenario's ``[clustered]`` table (Phase 1 and reply options);
    ``start`` and ``lr`` are the common start and step size of ``anchor-models`` Phase 1.
    ``robust`` holds the ``[robust]`` table (the aggregators' settings); ``uploads`` is what
    ``data-union`` trains with (the server-side trainer and the announced upload shapes).
    """
    if name in SINGLE_MODEL:
        nodes = dict(
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_nodes,
            min_evaluate_nodes=num_nodes, min_available_nodes=num_nodes,
        )
        opts = robust or {}
        if name == "fedavg":
            return CohortFedAvg(**nodes)
        if name == "fedprox":
            return CohortFedProx(proximal_mu=proximal_mu, **nodes)
        if name == "data-union":
            if uploads is None:
                raise ValueError("data-union needs a workload that trains on uploaded data (TrainsOnUploads)")
            return DataUnion(uploads, **nodes)
        if name == "fedtrimmedavg":
            return ROBUST[name](beta=opts.get("trim_beta", 0.2), **nodes)
        if name in ("krum", "multikrum"):
            extra = {"num_nodes_to_select": opts.get("multikrum_select", 5)} if name == "multikrum" else {}
            return ROBUST[name](num_malicious_nodes=opts.get("assumed_malicious", 1), **extra, **nodes)
        if name == "fedavg-clip":
            return ROBUST[name](clipping_norm=opts.get("clipping_norm", 1.0), **nodes)
        return ROBUST[name](**nodes)
    if name not in K_MODEL:
        raise ValueError(f"unknown strategy {name!r}; expected one of {list(STRATEGIES)}")
    opts = clustered or {}
    selection, refine_mu = k_model_roles(name, proximal_mu)
    return ClusteredStrategy(
        k,
        num_nodes=num_nodes,
        selection=selection,
        coarse_init=coarse_init_for(name, k, dim, seed, opts, start=start, lr=lr),
        proximal_mu=refine_mu,
        reply=opts.get("reply", "clients"),
        timeout=timeout,
        rule=cluster_rule(opts.get("aggregate", "mean"), robust or {}),
        refine=opts.get("refine", "first-order"),
        ridge=opts.get("ridge", 1e-6),
        update=opts.get("update", "mean"),
        server_lr=opts.get("server_lr", 1.0),
        server_momentum=opts.get("server_momentum", 0.0),
        assignment=opts.get("assignment", "hard"),
    )


CLUSTER_RULES = ("mean", "median", "trimmed-mean", "krum")


def cluster_rule(name: str, robust: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """``clustered.aggregate`` as a function (None: the exact example-weighted mean)."""
    if name == "mean":
        return None
    if name == "median":
        return coordinate_median
    if name == "trimmed-mean":
        return partial(trimmed_mean, beta=robust.get("trim_beta", 0.2))
    if name == "krum":
        return partial(krum, malicious=robust.get("assumed_malicious", 1))
    from strategies.catalog import load_object  # your own: package.module:function

    return load_object(name, "clustered.aggregate")
