"""Observers of the round engine that make the run record: history rows and checkpoints.

``History`` turns each ``RoundResult`` into the record's row. Row r describes the models
after round r (row 0: the models of round 1, i.e. the initial ones, or Phase 1's estimates
for the clustered strategies): the workload's central metrics, then, once the next exchange
has scored them on the clients, the mean local loss and the misclustering of the clients'
choices. Rows r >= 1 also hold the clients aggregated per model, the examples they trained
on, the workload's own per-round counts (totals, e.g. labels queried), dropped replies, nodes
that never replied, ``empty`` when no reply was usable (the round kept its models), whom each defense flagged (and, against simulated attackers, its true and
false positive rates) and the round's wall time.

``Checkpointer`` writes after every round everything the server's next round depends on.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
from flwr.common.logger import log

from proto.wire import CLUSTER, LOSS_BEFORE, Params
from server.engine import Arm, ArmObserver
from server.record import RunObserver, RunRecord
from strategies.result import RoundResult, fresh
from workloads.base import SimulatedAttacks, Workload
from workloads.federation import OUTCOMES


def scored_metrics(
    workload: Workload, models: Params, confusion: np.ndarray | None, loss: float | None
) -> dict[str, Any]:
    """What the clients say about the models they received: the mean local loss, and, when
    they know their true clusters, the misclustering of their choices and the adjusted Rand
    index of the partition they form against the true one (``ari``)."""
    out: dict[str, Any] = {workload.loss_name: loss}
    if confusion is not None:
        extra = workload.central_metrics(models, confusion)
        out.update({m: v for m, v in extra.items() if m.startswith("misclustering")})
        if confusion.shape[0] > 1:  # one model: every client in one group, ARI says nothing
            out["ari"] = adjusted_rand(confusion)
    return out


def adjusted_rand(confusion: np.ndarray) -> float | None:
    """ARI of the clients' chosen models against their true clusters, from the (chosen x
    true x size bucket) counts, straight from the contingency table (Hubert and Arabie 1985;
    O(k^2) however many clients); None without clients, 1.0 when both partitions are trivial."""
    table = np.asarray(confusion, dtype=np.float64)
    table = table.reshape(table.shape[0], table.shape[1], -1).sum(axis=2)
    n = table.sum()
    if n == 0:
        return None

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * cols / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # one cluster on both sides (or single clients): perfect agreement
        return 1.0
    return (index - expected) / (maximum - expected)


def round_counts(metrics: dict[str, float], examples: int) -> dict[str, float]:
    """The workload's own per-round counts (e.g. labels queried) as totals: replies carry
    every metric as a per-example mean."""
    return {m: v * examples for m, v in metrics.items() if m not in (LOSS_BEFORE, CLUSTER)}


def detection_rates(
    flags: dict[str, list[int]], participants: list[int] | None, malicious: np.ndarray
) -> dict[str, float | None]:
    """Per defense, the true positive rate (malicious clients flagged, of those taking
    part; None without any) and false positive rate (honest clients flagged)."""
    taking_part = set(participants) if participants is not None else set().union(*map(set, flags.values()))
    bad = taking_part & set(np.asarray(malicious).tolist())
    good = taking_part - bad
    out: dict[str, float | None] = {}
    for name, flagged in flags.items():
        hit = set(flagged)
        out[f"tpr_{name}"] = len(hit & bad) / len(bad) if bad else None
        out[f"fpr_{name}"] = len(hit & good) / len(good) if good else None
    return out


def placement_summary(placement: list[dict[str, Any]]) -> dict[str, Any]:
    """Which node (Ray node id, else host) ran which cohorts, and how many cohorts had to
    generate their data this round (0 after the first round with a data cache)."""
    nodes: dict[str, list[int]] = {}
    generated = 0
    devices: dict[str, Any] = {}
    for p in placement:
        try:  # telemetry from clients: an odd entry is skipped, never a crash
            partition = int(p.get("partition", -1))
        except (TypeError, ValueError):
            continue
        nodes.setdefault(str(p.get("ray-node") or p.get("host", "?")), []).append(partition)
        generated += p.get("generated") is True
        if isinstance(p.get("device"), dict):  # keyed by the device's first client id
            devices[str(partition)] = p["device"]
    out: dict[str, Any] = {
        "cohort_nodes": {n: sorted(parts) for n, parts in sorted(nodes.items())},
        "cohorts_generated": generated,
    }
    if devices:
        out["devices"] = dict(sorted(devices.items()))
    return out


def defense_row(result: RoundResult, malicious: np.ndarray) -> dict[str, Any]:
    """Whom each defense flagged and, against the arm's simulated attackers, its rates."""
    flags = result.defense.flags
    if not flags:
        return {}
    return {"flagged": flags, **detection_rates(flags, result.defense.participants, malicious)}


class History(ArmObserver):
    """Builds an arm's rows from its round results and hands each to ``observer`` (the run
    record, a progress bar) as soon as it is written. ``handed_in`` are the models the arm
    started from (row 0 names their key metric when Phase 1 replaced them); ``rows`` resumes
    an interrupted arm."""

    def __init__(self, workload: Workload, observer: RunObserver, handed_in: Params,
                 variant: str = "", rows: list[dict[str, Any]] | None = None) -> None:
        self.workload, self.observer, self.handed_in = workload, observer, handed_in
        self.resumed = rows is not None
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.malicious = (workload.malicious_clients(variant) if isinstance(workload, SimulatedAttacks)
                          else np.empty(0, np.int64))

    def on_arm_start(self, arm: Arm) -> None:
        if self.resumed:
            self.observer.on_strategy_resume(arm.label, arm.rounds, self.rows)
        else:
            self.observer.on_strategy_start(arm.label, arm.rounds)

    def first_row(self, result: RoundResult) -> dict[str, Any]:
        """Row 0: the models round 1 sent (Phase 1's, when it replaced those handed in)."""
        row: dict[str, Any] = {"round": 0, **self.workload.central_metrics(result.sent_models)}
        if result.phase1_warnings is not None:
            key = self.workload.key_metric
            handed_in = self.workload.central_metrics(self.handed_in).get(key)
            if handed_in is not None:  # (a loss, as the key metric, has no value before training)
                row[f"handed_in_{key}"] = handed_in
            row["phase1_warnings"] = result.phase1_warnings
        return row

    def round_row(self, round_: int, result: RoundResult, wall_time_s: float) -> dict[str, Any]:
        row: dict[str, Any] = {"round": round_, **self.workload.central_metrics(result.models)}
        row["clients"], row["examples"] = result.clients, result.examples
        telemetry = result.telemetry
        if telemetry.outcomes is not None:  # clients left out of the round, by reason
            row.update(zip(OUTCOMES, telemetry.outcomes.tolist()))
        if telemetry.placement:
            row.update(placement_summary(telemetry.placement))
        row.update(round_counts(result.metrics, result.examples))
        if result.cluster_clients is not None:
            row["cluster_clients"] = result.cluster_clients
        row.update(result.counts)
        row.update(defense_row(result, self.malicious))
        if result.arrays is None:  # no usable reply: the round kept the models it started with
            row["empty"] = True
        row["dropped"] = len(result.dropped)
        if result.dropped:
            row["dropped_replies"] = result.dropped
        if telemetry.missing_nodes:  # e.g. a device went offline: the round went on without it
            row["missing_nodes"] = telemetry.missing_nodes
        row["wall_time_s"] = wall_time_s
        return row

    def on_round(self, arm: Arm, round_: int, result: RoundResult, wall_time_s: float) -> None:
        if not self.rows:
            self.rows.append(self.first_row(result))
        self.rows[-1].update(scored_metrics(self.workload, result.sent_models, result.telemetry.confusion,
                                            result.metrics.get(LOSS_BEFORE)))
        if len(self.rows) == 1:
            self.observer.on_round(arm.label, self.rows[0])
        if result.telemetry.probes and isinstance(self.workload, SimulatedAttacks):
            self.workload.observe_probes(result.telemetry.probes)
        row = self.round_row(round_, result, wall_time_s)
        if row.get("empty"):
            log(logging.WARNING, "%s round %d: no usable reply; the round kept its models", arm.label, round_)
        for name, warning in self.workload.warn_counts.items():
            if row.get(name):
                log(logging.WARNING, "%s round %d: %g %s", arm.label, round_, row[name], warning)
        self.rows.append(row)
        self.observer.on_round(arm.label, row)

    def on_arm_end(self, arm: Arm, final: RoundResult) -> None:
        models = final.sent_models
        self.rows[-1].update(scored_metrics(self.workload, models, final.telemetry.confusion,
                                            final.metrics.get("loss")))
        report = self.workload.final_report(models)
        if report:
            self.rows[-1]["final"] = report
        self.observer.on_models(arm.label, models)
        self.observer.on_strategy_end(arm.label, self.rows)


class Checkpointer(ArmObserver):
    """After every round: the strategy object, the models, the rows so far and the random
    state (Flower samples nodes with the global ``random``), which is everything the next
    round depends on; ``--resume`` continues from it bit for bit."""

    def __init__(self, record: RunRecord, history: History) -> None:
        self.record, self.history = record, history

    def on_round(self, arm: Arm, round_: int, result: RoundResult, wall_time_s: float) -> None:
        self.record.save_checkpoint({"arm": arm.label, "round": round_, "strategy": arm.strategy,
                                     "arrays": fresh(arm.arrays), "rows": self.history.rows,
                                     "random": random.getstate(), "numpy_random": np.random.get_state()})
