"""Flower's ``Grid`` in one process: the in-process exchange under the reference.

``LocalGrid`` hands every message to the ``ClientApp`` of its node, here and now, and
returns the replies, one node after another. The round engine, the strategy classes and
the ClientApp are the real ones, so a run over a ``LocalGrid`` is the Flower run's code path
minus the transport: its records equal the simulation's (tested), and it serves the
statistical tests, the benchmarks and the centralised baselines at the numpy limit.

As in Flower, each node keeps its ``Context`` (node config and ``context.state``) for the
whole run, and a ClientApp that raises answers with an error reply instead of stopping
the run.
"""

from __future__ import annotations

import itertools
import logging
import traceback
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from server.flower_patches import allow_messages_outside_a_run

RUN_ID = 1


class LocalGrid(Grid):
    """Nodes ``1 .. len(node_configs)``, each served in this process by ``client_app``."""

    def __init__(self, client_app: Any, node_configs: list[dict[str, Any]]) -> None:
        allow_messages_outside_a_run()
        self.client_app = client_app
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={})
            for node, cfg in enumerate(node_configs, start=1)
        }
        self._run = Run.create_empty(RUN_ID)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def deliver(self, message: Message) -> Message:
        """The reply of the message's node (an error reply when its ClientApp raises)."""
        message.metadata.__dict__["_message_id"] = f"local-{next(self._ids)}"
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as err:  # as Flower does: the node answers with an error
            log(logging.ERROR, "node %d: ClientApp raised:\n%s", context.node_id, traceback.format_exc())
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(err)), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            reply = self.deliver(message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
