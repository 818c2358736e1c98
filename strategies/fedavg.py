"""FedAvg and FedProx on one global model, for cohort replies.

Thin adapters over Flower's own ``FedAvg`` / ``FedProx`` (``flwr.serverapp.strategy``):
sampling, the ``proximal-mu`` config entry and message construction are Flower's; only the
aggregation changes, because a reply carries a batch of virtual clients rather than one
model. Malformed replies are dropped and named in the round metrics instead of aborting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from strategies.aggregation import (
    ClientBatch,
    MalformedBatch,
    merge_batches,
    metric_means,
    weighted_average,
)
from strategies.cohort_reply import (
    decode_batch,
    decode_outcomes,
    is_empty_reply,
    params_to_record,
    record_to_params,
)


T = TypeVar("T")


class RoundReport:
    """What the last aggregation saw: accepted clients, dropped replies and why."""

    def __init__(self) -> None:
        self.clients = 0
        self.examples = 0  # training examples behind the aggregate (e.g. labels used)
        self.dropped: list[str] = []
        self.metrics: dict[str, float] = {}
        self.confusion: np.ndarray | None = None  # chosen x true cluster x size bucket
        self.cluster_sizes: list[int] | None = None  # clients aggregated per model
        self.outcomes: np.ndarray | None = None  # clients left out, by reason (OUTCOMES)
        self.placement: list[dict] = []  # where each cohort ran (node, process, data generated)
        self.participants: list[int] | None = None  # client ids aggregated (when the strategy lists them)
        self.flags: dict[str, list[int]] = {}  # per defense: the clients it set aside or flagged
        self.extra: dict[str, float] = {}  # the strategy's own per-round counts, recorded as they are
        self.probes: list[dict[str, np.ndarray]] = []  # what simulated attackers reveal to the evaluator


def decode_replies(
    replies: Iterable[Message], decode: Callable[[RecordDict], T], report: RoundReport
) -> list[T]:
    """Decode every reply; error replies and malformed ones are dropped and named."""
    decoded = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            report.dropped.append(f"node {node}: error reply: {msg.error.reason}")
            continue
        add_telemetry(msg.content, node, report)
        if is_empty_reply(msg.content):
            continue
        try:
            decoded.append(decode(msg.content))
        except MalformedBatch as err:
            report.dropped.append(f"node {node}: {err}")
    return decoded


def add_telemetry(content: RecordDict, node: int, report: RoundReport) -> None:
    """Where the cohort ran and the clients it left out, by reason. Telemetry never affects
    the aggregate: unreadable counts are ignored and named with the dropped replies."""
    if "node" in content:
        try:
            where = dict(content["node"])
            if "device" in content:  # a device's durable state, as it read it from disk
                where["device"] = dict(content["device"])
            report.placement.append(where)
        except (TypeError, ValueError):
            report.dropped.append(f"node {node}: unreadable placement record ignored")
    if "probe" in content:  # evaluation only (e.g. an attacker's trigger); never aggregated
        try:
            report.probes.append(record_to_params(content["probe"]))
        except (TypeError, ValueError):
            report.dropped.append(f"node {node}: unreadable probe ignored")
    try:
        outcomes = decode_outcomes(content)
        if outcomes is not None and report.outcomes is not None and report.outcomes.shape != outcomes.shape:
            raise MalformedBatch(f"outcome counts of shape {outcomes.shape}")
    except (MalformedBatch, KeyError, TypeError, ValueError) as err:
        report.dropped.append(f"node {node}: outcome counts ignored ({err})")
        return
    if outcomes is not None:
        report.outcomes = outcomes if report.outcomes is None else report.outcomes + outcomes


def log_dropped(report: RoundReport) -> None:
    for reason in report.dropped:
        log(WARNING, "dropped reply from %s", reason)


def collect(
    replies: Iterable[Message], reference: ArrayRecord | None, report: RoundReport
) -> ClientBatch | None:
    """Decode every reply, dropping (and naming) the malformed ones; merge the rest."""
    ref = record_to_params(reference) if reference is not None else None
    batches = decode_replies(replies, lambda content: decode_batch(content, ref), report)
    try:
        merged = merge_batches(batches)
    except MalformedBatch as err:  # two nodes claimed one client: trust neither
        report.dropped.append(f"all nodes: {err}")
        merged = None
    log_dropped(report)
    report.clients = 0 if merged is None else len(merged)
    report.examples = 0 if merged is None else int(merged.num_examples.sum())
    return merged


class CohortAggregation:
    """Mixin: example-weighted averaging over the clients of every cohort reply."""

    last_report: RoundReport

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = arrays  # the shape every reply must match
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.last_report = report = RoundReport()
        batch = collect(replies, self._reference, report)
        if batch is None:
            return None, None
        report.metrics = metric_means(batch)
        return self.combine(server_round, batch, report), MetricRecord(report.metrics)

    def combine(self, server_round: int, batch: ClientBatch, report: RoundReport) -> ArrayRecord | None:
        """The new model from the round's valid clients: their example-weighted mean."""
        return params_to_record(weighted_average(batch))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        self.last_report = report = RoundReport()
        batch = collect(replies, None, report)
        if batch is None:
            return None
        report.metrics = metric_means(batch)
        return MetricRecord(report.metrics)


class CohortFedAvg(CohortAggregation, FedAvg):
    """Flower's FedAvg over cohorts of virtual clients."""


class CohortFedProx(CohortAggregation, FedProx):
    """Flower's FedProx over cohorts; clients read ``proximal-mu`` from the config."""
