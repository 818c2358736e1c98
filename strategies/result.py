"""What a strategy hands the round engine after a round: one documented result.

Every umbel strategy implements ``ReportingStrategy``: Flower's ``Strategy`` (so it also runs
under Flower's own ``Strategy.start``) plus two methods that return a ``RoundResult``:
``aggregate_round`` after a train exchange and ``evaluate_round`` after an evaluate exchange.
Flower's ``aggregate_train``/``aggregate_evaluate`` are derived from them. The server reads
nothing else from a strategy.

A result has three parts: the aggregation itself (models, counts, dropped replies with
reasons), ``Telemetry`` (where cohorts ran, who was left out, the clients' cluster choices
against their true clusters, what simulated attackers reveal: none of it changes the models)
and ``Defense`` (whom each defense flagged).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from proto.wire import Params, params_to_record, record_to_params


@dataclass
class Telemetry:
    """What the round's replies say besides the aggregate; never changes the models."""

    placement: list[dict[str, Any]] = field(default_factory=list)  # where each cohort ran
    outcomes: np.ndarray | None = None  # clients left out, by reason (federation.OUTCOMES)
    confusion: np.ndarray | None = None  # chosen x true cluster x size bucket (labelled clients only)
    probes: list[Params] = field(default_factory=list)  # what simulated attackers reveal
    missing_nodes: list[int] = field(default_factory=list)  # nodes that never replied (set by the engine)


@dataclass
class Defense:
    """Per defense, the clients it set aside or flagged, and the clients aggregated."""

    flags: dict[str, list[int]] = field(default_factory=dict)
    participants: list[int] | None = None


@dataclass
class RoundResult:
    """One round of one strategy, as the strategy reports it.

    ``arrays`` holds the models after the round in Flower's form (what the next
    ``configure_train`` takes): one model, or k models stacked on a leading axis when
    ``k_models``; it is None when nothing could be aggregated (the engine then keeps the
    models the round sent, ``sent``). ``metrics`` are per-example means of the clients'
    metric sums (``loss-before``: the loss of the models the round sent; workload counts);
    ``counts`` are the strategy's own per-round counts (e.g. rejected uploads).
    """

    sent: ArrayRecord
    k_models: bool
    arrays: ArrayRecord | None = None
    clients: int = 0
    examples: int = 0
    cluster_clients: list[int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    phase1_warnings: list[str] | None = None  # set in the round a Phase 1 ran
    telemetry: Telemetry = field(default_factory=Telemetry)
    defense: Defense = field(default_factory=Defense)

    def stacked(self, arrays: ArrayRecord) -> Params:
        """``arrays`` as models on a leading model axis (one for single-model strategies)."""
        params = record_to_params(arrays)
        return params if self.k_models else {n: v[None] for n, v in params.items()}

    @property
    def sent_models(self) -> Params:
        return self.stacked(self.sent)

    @property
    def models(self) -> Params:
        """The models after the round (the ones sent when nothing was aggregated)."""
        return self.stacked(self.arrays if self.arrays is not None else self.sent)

    def log_dropped(self) -> None:
        for reason in self.dropped:
            log(WARNING, "dropped reply from %s", reason)


def fresh(arrays: ArrayRecord) -> ArrayRecord:
    """The same arrays in a new record: once Flower's network grid has sent a record, its
    arrays cache pieces holding memoryviews, which cannot be pickled (checkpoints)."""
    return params_to_record(record_to_params(arrays))


class ReportingStrategy(Strategy):
    """A Flower strategy that reports each round as a ``RoundResult``. It pickles (the
    round's checkpoint) with every ``ArrayRecord`` it holds re-made fresh."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: fresh(v) if isinstance(v, ArrayRecord) else v for k, v in self.__dict__.items()}

    @abstractmethod
    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Aggregate a train exchange's replies."""

    @abstractmethod
    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Read an evaluate exchange's replies: ``metrics["loss"]`` and the telemetry."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = self.aggregate_round(server_round, replies)
        if result.arrays is None:
            return None, None
        return result.arrays, MetricRecord(result.metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        result = self.evaluate_round(server_round, replies)
        return MetricRecord(result.metrics) if result.metrics else None
