"""The one round engine: an arm's rounds over a Flower ``Grid``.

The same loop runs over Flower's grid (the simulation engine, a deployment) and, unchanged,
over the in-process exchange (``server.local_grid.LocalGrid``, the reference). It calls the
real strategy classes and knows nothing of workloads, records or checkpoints: those hang off
it as ``ArmObserver``s, which see every round's ``RoundResult``.

A stop request (SIGINT/SIGTERM, ``server.interrupt``) ends an arm between rounds: the
exchanges stop waiting for replies, and a round that was in flight is neither aggregated
into the record nor checkpointed, so ``--resume`` redoes it.

Each round is one train exchange: replies carry each client's loss under the models it
received (the previous round's), so no evaluate exchange is needed until the last round,
whose one evaluate exchange scores the final models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server import interrupt
from strategies.result import ReportingStrategy, RoundResult

# A grid that sets no ``pull_interval`` talks to a SuperLink over the network (Flower's HttpGrid),
# where every pull is a request the SuperLink answers. At 5 ms (the in-memory grid's setting,
# server.app) the SuperLink of a one-round, two-device deployment test used 16 s of CPU; at 0.1 s,
# 13 s. 0.1 s adds at most that to an exchange whose devices poll every 0.5 s or more.
NETWORK_PULL_INTERVAL_S = 0.1


@dataclass(kw_only=True)
class Arm:
    """One strategy's run: what the engine needs, and the models it threads through rounds.

    ``arrays`` holds the models handed to the next round (Flower's form: one model, or k
    stacked); ``first_round`` is 1, or the round after a checkpoint; ``lr(round)`` is the
    local step size sent with each round."""

    label: str
    strategy: ReportingStrategy
    arrays: ArrayRecord
    config: ConfigRecord
    rounds: int
    timeout: float
    lr: Callable[[int], float]
    first_round: int = 1


class ArmObserver:
    """What hangs off the engine (history rows, checkpoints, ...); the default does nothing."""

    def on_arm_start(self, arm: Arm) -> None: ...

    def on_round(self, arm: Arm, round_: int, result: RoundResult, wall_time_s: float) -> None:
        """After round ``round_``'s aggregation; ``arm.arrays`` already holds its models."""

    def on_arm_end(self, arm: Arm, final: RoundResult) -> None:
        """After the evaluate exchange that scored the final models (``final.sent``)."""


class StoppableGrid:
    """A grid whose exchanges stop waiting when a stop is requested (``Interrupted``);
    everything else is the wrapped grid's. Flower's ``send_and_receive`` (push, then pull
    until every reply came or ``timeout``) would wait out a whole round first."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = getattr(self.grid, "pull_interval", NETWORK_PULL_INTERVAL_S)
        replies: list[Message] = []
        while True:
            interrupt.check()
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                return replies
            time.sleep(interval)


def missing_nodes(messages: Iterable[Message], replies: Iterable[Message]) -> list[int]:
    """Nodes sent a message that never replied (e.g. a device that went offline)."""
    return sorted({m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies})


def train_round(grid: Grid, arm: Arm, round_: int) -> tuple[RoundResult, float]:
    """One train exchange and its aggregation; returns the result and its wall time. When
    nothing could be aggregated, the models the round sent go on to the next round."""
    start = time.perf_counter()
    arm.config["lr"] = arm.lr(round_)
    messages = list(arm.strategy.configure_train(round_, arm.arrays, arm.config, grid))
    replies = list(grid.send_and_receive(messages, timeout=arm.timeout))
    result = arm.strategy.aggregate_round(round_, replies)
    wall = time.perf_counter() - start
    result.telemetry.missing_nodes = missing_nodes(messages, replies)
    arm.arrays = result.arrays if result.arrays is not None else result.sent
    return result, wall


def evaluate_final(grid: Grid, arm: Arm) -> RoundResult:
    """One evaluate exchange on the final models."""
    strategy = arm.strategy
    messages = list(strategy.configure_evaluate(arm.rounds, arm.arrays, ConfigRecord(dict(arm.config)), grid))
    replies = list(grid.send_and_receive(messages, timeout=arm.timeout))
    result = strategy.evaluate_round(arm.rounds, replies)
    result.telemetry.missing_nodes = missing_nodes(messages, replies)
    return result


def run_arm(grid: Grid, arm: Arm, observers: Iterable[ArmObserver]) -> ArrayRecord:
    """Rounds ``arm.first_round`` to ``arm.rounds``, then the final evaluation; returns the
    final models. Raises ``server.interrupt.Interrupted`` on a stop request, before the
    observers see the round in flight."""
    grid = StoppableGrid(grid)
    observers = list(observers)
    for observer in observers:
        observer.on_arm_start(arm)
    for round_ in range(arm.first_round, arm.rounds + 1):
        interrupt.check()
        result, wall = train_round(grid, arm, round_)
        interrupt.check()
        for observer in observers:
            observer.on_round(arm, round_, result, wall)
    final = evaluate_final(grid, arm)
    interrupt.check()
    for observer in observers:
        observer.on_arm_end(arm, final)
    return arm.arrays
