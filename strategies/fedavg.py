"""FedAvg and FedProx on one global model, for cohort replies.

Thin adapters over Flower's own ``FedAvg`` / ``FedProx`` (``flwr.serverapp.strategy``):
sampling, the ``proximal-mu`` config entry and message construction are Flower's; only the
aggregation changes, because a reply carries a batch of virtual clients rather than one
model. Malformed replies are dropped and named in the round's result instead of aborting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from proto.wire import (
    ClientBatch,
    MalformedBatch,
    decode_batch,
    decode_outcomes,
    is_empty_reply,
    payload_bytes,
    params_to_record,
    record_to_params,
)
from strategies.aggregation import drop_shared_clients, merge_batches, metric_means, weighted_average
from strategies.result import ReportingStrategy, RoundResult, Telemetry

T = TypeVar("T")


def decode_replies(
    replies: Iterable[Message], decode: Callable[[RecordDict], T], result: RoundResult
) -> list[tuple[int, T]]:
    """Decode every reply, as (the node that sent it, what it holds); error replies and
    malformed ones are dropped and named. The arrays' bytes are counted (``reply_bytes``)."""
    decoded = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            result.dropped.append(f"node {node}: error reply: {msg.error.reason}")
            continue
        add_telemetry(msg.content, node, result)
        result.counts["reply_bytes"] = result.counts.get("reply_bytes", 0) + payload_bytes(msg.content)
        if is_empty_reply(msg.content):
            continue
        try:
            decoded.append((node, decode(msg.content)))
        except MalformedBatch as err:
            result.dropped.append(f"node {node}: {err}")
    return decoded


def add_telemetry(content: RecordDict, node: int, result: RoundResult) -> None:
    """Where the cohort ran, what a simulated attacker revealed and the clients left out,
    by reason. Telemetry never affects the aggregate: an unreadable part is ignored and
    named with the dropped replies."""
    telemetry: Telemetry = result.telemetry
    if "node" in content:
        try:
            where = dict(content["node"])
            if "device" in content:  # a device's durable state, as it read it from disk
                where["device"] = dict(content["device"])
            telemetry.placement.append(where)
        except (TypeError, ValueError):
            result.dropped.append(f"node {node}: unreadable placement record ignored")
    if "probe" in content:  # evaluation only (e.g. an attacker's trigger); never aggregated
        try:
            telemetry.probes.append(record_to_params(content["probe"]))
        except (TypeError, ValueError):
            result.dropped.append(f"node {node}: unreadable probe ignored")
    try:
        outcomes = decode_outcomes(content)
        if outcomes is not None and telemetry.outcomes is not None and telemetry.outcomes.shape != outcomes.shape:
            raise MalformedBatch(f"outcome counts of shape {outcomes.shape}")
    except (MalformedBatch, KeyError, TypeError, ValueError) as err:
        result.dropped.append(f"node {node}: outcome counts ignored ({err})")
        return
    if outcomes is not None:
        telemetry.outcomes = outcomes if telemetry.outcomes is None else telemetry.outcomes + outcomes


def collect(replies: Iterable[Message], reference: ArrayRecord | None, result: RoundResult) -> ClientBatch | None:
    """Decode every reply, dropping (and naming) the malformed ones; merge the rest."""
    ref = record_to_params(reference) if reference is not None else None
    batches = decode_replies(replies, lambda content: decode_batch(content, ref), result)
    merged = merge_batches(unshared(batches, result))
    result.log_dropped()
    if merged is not None:
        result.clients, result.examples = len(merged), int(merged.num_examples.sum())
    return merged


def unshared(batches: list[tuple[int, ClientBatch]], result: RoundResult) -> list[ClientBatch]:
    """The nodes' batches without the clients that more than one report claims (named in
    ``result.dropped``; see ``drop_shared_clients``)."""
    kept, reasons = drop_shared_clients([b for _, b in batches], [node for node, _ in batches])
    result.dropped.extend(reasons)
    return kept


class CohortAggregation(ReportingStrategy):
    """Mixin: example-weighted averaging over the clients of every cohort reply."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays  # the model every reply must match
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[safe-super]

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        result = RoundResult(sent=self.sent, k_models=False)
        batch = collect(replies, self.sent, result)
        if batch is not None:
            result.metrics = metric_means(batch)
            result.arrays = self.combine(server_round, batch, result)
        return result

    def combine(self, server_round: int, batch: ClientBatch, result: RoundResult) -> ArrayRecord | None:
        """The new model from the round's valid clients: their example-weighted mean."""
        return params_to_record(weighted_average(batch))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[safe-super]

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        result = RoundResult(sent=self.sent, k_models=False)
        batch = collect(replies, None, result)
        if batch is not None:
            result.metrics = metric_means(batch)
        return result

    def flower_aggregate_train(self, server_round: int, replies: Iterable[Message]) -> ArrayRecord | None:
        """The Flower class's own ``aggregate_train`` (the next one in the MRO after the
        reporting layer), e.g. Flower's Krum on one reply per client."""
        arrays, _ = super(ReportingStrategy, self).aggregate_train(server_round, replies)  # type: ignore[misc]
        return arrays


class CohortFedAvg(CohortAggregation, FedAvg):
    """Flower's FedAvg over cohorts of virtual clients."""


class CohortFedProx(CohortAggregation, FedProx):
    """Flower's FedProx over cohorts; clients read ``proximal-mu`` from the config."""
