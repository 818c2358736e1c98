"""What a cohort computes in a round, as pure functions (no Flower here).

The client app (``client.app``) wraps these in messages; the tests call them directly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from proto.exact_sum import DD, dd_add, dd_sum
from proto.wire import (
    ANCHOR_TRAIN, CLIENT_ID, CLUSTER, LOSS_BEFORE, NORMAL_CONSTANT, NORMAL_MATRIX, NORMAL_VECTOR, REDUCE_ROWS, ClientBatch,
    CohortResult, cluster_sums, combine_sums,
)
from workloads.base import (
    SIZE_BUCKETS, CoarseStatistics, CohortData, KnownClusters, NormalEquations, Params, Stateful, TrainSettings,
    Workload, size_bucket,
)
from workloads.federation import round_participation, update_scales

SELECTIONS = ("min-loss", "true-label", "single")
COARSE_CHUNK = 2048  # clients per pass of a Phase-1 statistic
REPLIES = ("clients", "sums")
REFINEMENTS = ("first-order", "second-order")
ASSIGNMENTS = ("hard", "soft")  # soft: the server weighs every client in every cluster (second order)
NORMAL_BYTES = 2**28  # second-order: clients per pass so that their P x P matrices stay under this
NORM_BIT = "norm_bit"  # Flower's name (flwr.supercore.differential_privacy.KEY_NORM_BIT)


def assign_clusters(losses: np.ndarray) -> np.ndarray:
    """(B, k) local losses -> the chosen cluster of each client (ties: lowest index)."""
    return np.argmin(losses, axis=1)


def true_clusters(workload: Workload, data: CohortData) -> np.ndarray | None:
    """The cohort's true clusters when the workload and its data know them (synthetic
    federations); None for device data and workloads without clusters."""
    return workload.true_clusters(data) if isinstance(workload, KnownClusters) else None


def select_models(
    workload: Workload, data: CohortData, models: Params, selection: str
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen cluster (B,), mean loss under it (B,)) for every client of the cohort."""
    losses = workload.local_losses(models, data)
    if selection == "min-loss":
        choice = assign_clusters(losses)
    elif selection == "true-label":
        labels = true_clusters(workload, data)
        if labels is None:
            raise ValueError("the oracle needs true cluster labels, which this data lacks")
        choice = np.asarray(labels, dtype=np.int64)
    elif selection == "single":
        choice = np.zeros(len(data.client_ids), dtype=np.int64)
    else:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    return choice, losses[np.arange(len(choice)), choice]


def confusion_counts(
    workload: Workload, data: CohortData, choice: np.ndarray, k: int, index: np.ndarray | slice
) -> np.ndarray | None:
    """(chosen model x true cluster x size bucket) client counts over ``index``; None when
    the data carry no true labels (real deployments)."""
    labels = true_clusters(workload, data)
    if labels is None:
        return None
    counts = np.zeros((k, workload.num_clusters, len(SIZE_BUCKETS)), np.int64)
    np.add.at(counts, (choice[index], labels[index], size_bucket(data.num_examples[index])), 1)
    return counts


def active_mask(federation: dict[str, Any], data: CohortData, round_: int) -> np.ndarray:
    """Which clients of the cohort take part in this round (``round_participation``)."""
    return round_participation(federation, data.client_ids, round_).active


def begin_round(
    workload: Workload,
    data: CohortData,
    models: Params,
    state: Params | None,
    *,
    round_: int,
    variant: str,
    federation: dict[str, Any],
) -> tuple[CohortData, Params | None, dict[str, np.ndarray]]:
    """A stateful workload's round start: (data to train on, new state, per-client metric
    sums). ``state=None`` starts from the workload's initial state; stateless workloads
    return their data unchanged."""
    if not isinstance(workload, Stateful):
        return data, None, {}
    if state is None:
        state = workload.initial_state(data)
    k = len(next(iter(models.values())))
    if k != 1:
        raise ValueError(f"workload {workload.name!r} keeps state per model; it takes one model, not {k}")
    state, metrics = workload.update_state(
        {n: v[0] for n, v in models.items()}, data, state, round_, variant,
        active_mask(federation, data, round_),
    )
    return workload.with_state(data, state), state, metrics


def train_cohort(
    workload: Workload,
    data: CohortData,
    models: Params,
    *,
    selection: str,
    reply: str,
    settings: TrainSettings,
    round_: int,
    federation: dict[str, Any],
    extra_metrics: dict[str, np.ndarray] | None = None,
    clipping_norm: float | None = None,
    refine: str = "first-order",
    assignment: str = "hard",
) -> CohortResult:
    """Each active client picks a model, trains it from there, and the cohort replies.

    ``models`` holds k models stacked on a leading axis. Inactive clients (not sampled this
    round, offline, dropping out or missing the deadline) neither train nor appear in the
    reply; the reply counts them by reason (``federation.OUTCOMES``). ``extra_metrics`` are
    per-client sums (e.g. from ``begin_round``) added to the reply of the active clients.
    ``clipping_norm`` (client-side differential privacy, as Flower's clipping mods do it):
    each client's update is clipped to that L2 norm, and ``norm_bit`` says whom it clipped.
    Clients the scenario makes attackers (``federation.scaled_update_fraction``) then scale
    their update.

    ``refine = "second-order"``: clients do not train; each sends its normal equations
    (``NormalEquations``: per-example X'X/n and X'y/n) for the cluster it picked, and the
    server solves each cluster's least squares. ``assignment = "soft"`` (second order, per-client
    replies): each also sends its y'y/n, so that the server can score it under every model.
    """
    if reply not in REPLIES:
        raise ValueError(f"unknown reply form {reply!r}; expected one of {REPLIES}")
    if refine not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refine!r}; expected one of {REFINEMENTS}")
    if refine == "second-order" and not isinstance(workload, NormalEquations):
        raise ValueError(f"second-order refinement needs normal equations, which {workload.name!r} does not provide")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment!r}; expected one of {ASSIGNMENTS}")
    if assignment == "soft" and (refine != "second-order" or reply != "clients"):
        raise ValueError("soft assignments need second-order refinement and per-client replies")
    k = len(next(iter(models.values())))
    participation = round_participation(federation, data.client_ids, round_)
    outcomes = participation.counts()
    idx = np.flatnonzero(participation.active)
    if len(idx) == 0:
        none_chose = np.zeros(len(data.client_ids), dtype=np.int64)
        return CohortResult(None, None, confusion_counts(workload, data, none_chose, k, idx), outcomes)
    # Only the clients taking part compute anything (a 10% sample costs 10% of the cohort).
    sub = data if len(idx) == len(data.client_ids) else workload.subset(data, idx)
    choice, loss = select_models(workload, sub, models, selection)
    confusion = confusion_counts(workload, sub, choice, k, slice(None))
    counts = sub.num_examples
    if refine == "second-order":
        return normal_equations_reply(workload, sub, choice, loss * counts, k, reply, confusion, outcomes,
                                      constant=assignment == "soft")
    start = {name: v[choice] for name, v in models.items()}
    trained = workload.local_train(start, sub, replace(settings, server_round=round_))
    extra = {name: np.asarray(v, np.float64)[idx] for name, v in (extra_metrics or {}).items()}
    if clipping_norm is not None:
        trained, clipped = clip_updates(trained, start, clipping_norm)
        extra[NORM_BIT] = clipped * counts  # per-client sums, like every metric of a reply
    scales = update_scales(federation, sub.client_ids)
    if scales is not None:
        trained = scale_updates(trained, start, scales)
    loss_sums = loss * counts
    if reply == "sums":
        return CohortResult(None, cluster_sums(choice, counts, trained, loss_sums, k), confusion, outcomes)
    batch = ClientBatch(sub.client_ids, counts, trained,
                        {LOSS_BEFORE: loss_sums, CLUSTER: choice.astype(np.float64), **extra})
    return CohortResult(batch, None, confusion, outcomes)


def normal_equations_reply(
    workload: Workload, data: CohortData, choice: np.ndarray, loss_sums: np.ndarray, k: int, reply: str,
    confusion: np.ndarray | None, outcomes: np.ndarray | None, constant: bool = False,
) -> CohortResult:
    """Second-order refinement's reply: each client's normal equations under the cluster it
    picked, per client or summed per cluster (computed a pass of clients at a time, so the
    P x P matrices of a large cohort never exist at once; the double-double sums do not
    depend on the passes). ``constant``: also each client's y'y/n (``NORMAL_CONSTANT``)."""
    assert isinstance(workload, NormalEquations)
    counts, num = data.num_examples, len(data.client_ids)
    size = sum(v.size for v in workload.initial_parameters().values())
    per_pass = max(1, NORMAL_BYTES // (8 * size * size))
    passes = [np.arange(lo, min(lo + per_pass, num)) for lo in range(0, num, per_pass)]
    parts = []
    for index in passes:
        part = data if len(index) == num else workload.subset(data, index)
        matrix, vector, const = workload.normal_equations(part)
        stats = {NORMAL_MATRIX: matrix, NORMAL_VECTOR: vector}
        if constant:
            stats[NORMAL_CONSTANT] = const
        parts.append((index, stats))
        if reply == "sums":  # add this pass now, keep no matrices
            parts[-1] = cluster_sums(choice[index], counts[index], parts[-1][1], loss_sums[index], k)
    if reply == "sums":
        return CohortResult(None, combine_sums(parts), confusion, outcomes)
    params = {name: np.concatenate([p[name] for _, p in parts]) for name in parts[0][1]}
    batch = ClientBatch(data.client_ids, counts, params,
                        {LOSS_BEFORE: loss_sums, CLUSTER: choice.astype(np.float64)})
    return CohortResult(batch, None, confusion, outcomes)


def _per_client(v: np.ndarray, factor: np.ndarray) -> np.ndarray:
    return factor.reshape(-1, *([1] * (v.ndim - 1)))


def clip_updates(trained: Params, start: Params, norm: float) -> tuple[Params, np.ndarray]:
    """Each client's update (``trained - start``, all parameters together) clipped to L2
    ``norm``; returns the models and, per client, 1.0 where it was clipped."""
    updates = {n: np.asarray(trained[n], np.float64) - start[n] for n in trained}
    norms = np.sqrt(sum((u.reshape(len(u), -1) ** 2).sum(axis=1) for u in updates.values()))
    factor = np.minimum(1.0, norm / np.maximum(norms, 1e-300))
    clipped = {n: start[n] + updates[n] * _per_client(updates[n], factor) for n in trained}
    return clipped, (factor < 1).astype(np.float64)


def scale_updates(trained: Params, start: Params, scales: np.ndarray) -> Params:
    """``start + scale * (trained - start)`` per client."""
    return {n: start[n] + (np.asarray(trained[n], np.float64) - start[n]) * _per_client(trained[n], scales)
            for n in trained}


def evaluate_cohort(
    workload: Workload, data: CohortData, models: Params, selection: str
) -> tuple[np.ndarray, DD, np.ndarray | None]:
    """(examples, loss sum as a double-double, confusion) under each client's chosen model."""
    k = len(next(iter(models.values())))
    choice, loss = select_models(workload, data, models, selection)
    confusion = confusion_counts(workload, data, choice, k, slice(None))
    return np.array([data.num_examples.sum()]), dd_sum(loss * data.num_examples), confusion


def coarse_statistics(workload: Workload, step: str, request: Params, data: CohortData) -> dict[str, np.ndarray]:
    """One Phase-1 step on a cohort: ``anchor-train`` for any workload, the workload's own
    steps when it declares ``CoarseStatistics``."""
    if step == ANCHOR_TRAIN:
        return workload.anchor_models(request, data)
    if isinstance(workload, CoarseStatistics) and step in workload.coarse_steps:
        return workload.coarse_statistics(step, request, data)
    raise ValueError(f"workload {workload.name!r} has no coarse-estimate step {step!r}")


def coarse_cohort(
    workload: Workload, data: CohortData, step: str, request: Params, reduce: str
) -> dict[str, np.ndarray]:
    """A Phase-1 step: the workload's statistics, summed over the cohort or as rows.

    Computed ``COARSE_CHUNK`` clients at a time, or the workload's ``coarse_chunk`` (per-client
    statistics such as d x d moments would not fit for a large cohort at once); double-double
    sums make the result independent of the chunking.
    """
    num = len(data.client_ids)
    chunk = workload.coarse_chunk() if isinstance(workload, CoarseStatistics) else COARSE_CHUNK
    parts = [data] if num <= chunk else [
        workload.subset(data, np.arange(lo, min(lo + chunk, num))) for lo in range(0, num, chunk)
    ]
    rows: dict[str, list[np.ndarray]] = {}
    sums: dict[str, DD] = {}
    clients = 0
    for part in parts:
        stats = coarse_statistics(workload, step, request, part)
        ids = stats.pop(CLIENT_ID)
        clients += len(ids)
        if reduce == REDUCE_ROWS:
            for name, values in {CLIENT_ID: ids, **stats}.items():
                rows.setdefault(name, []).append(values)
            continue
        for name, values in stats.items():
            part_sum = dd_sum(values)
            sums[name] = dd_add(sums[name], part_sum) if name in sums else part_sum
    if reduce == REDUCE_ROWS:
        return {name: np.concatenate(values) for name, values in rows.items()}
    out = {}
    for name, (hi, lo) in sums.items():
        out[f"{name}.hi"], out[f"{name}.lo"] = hi, lo
    out["clients"] = np.array([clients])
    return out
