"""``ClusteredStrategy``: a Flower ``Strategy`` for k models over cohorts of clients.

One class, configured three ways (see ``strategies.build_strategy``):
- the clustered mixed-regression algorithm (Su, Xu, Yang 2022): Phase 1 (a ``CoarseInit``)
  runs inside the first ``configure_train``, replacing the models handed in; then every round
  each client picks its min-loss model and refines it with FedAvg steps or FedProx;
- IFCA (Ghosh et al. 2020): the same rounds from the models handed in, without Phase 1;
- the oracle: every client uses its true cluster (synthetic data only).

It works under Flower's own ``Strategy.start`` as well as under umbel's server loop, and
threads the k models from round to round as one ``ArrayRecord`` (each array stacked on a
leading model axis). All arithmetic is in ``strategies.clustered`` (pure numpy).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.aggregation import MalformedBatch, Params
from strategies.clustered import aggregate_results, cluster_means, combine
from strategies.coarse_init import CoarseInit, CoarseResult, reduce_coarse
from strategies.cohort_reply import (
    decode_clustered_batch,
    decode_confusion,
    decode_sums,
    params_to_record,
    record_to_params,
)
from strategies.exact_sum import dd_add, dd_value
from strategies.fedavg import RoundReport, decode_replies, log_dropped

COARSE_ACTION = "query.coarse"


class ClusteredStrategy(Strategy):
    def __init__(
        self,
        k: int,
        *,
        num_nodes: int,
        selection: str = "min-loss",
        coarse_init: CoarseInit | None = None,
        proximal_mu: float = 0.0,
        reply: str = "clients",
        timeout: float = 600.0,
    ) -> None:
        self.k, self.num_nodes, self.selection = k, num_nodes, selection
        self.coarse_init, self.proximal_mu, self.reply = coarse_init, proximal_mu, reply
        self.timeout = timeout
        self.coarse: CoarseResult | None = None
        self.last_report = RoundReport()
        self.sent_models: Params | None = None

    def summary(self) -> None:
        log(INFO, "\t├── k = %d, selection %s, replies as %s", self.k, self.selection, self.reply)
        log(INFO, "\t├── Phase 1: %s", self.coarse_init.name if self.coarse_init else "none")
        log(INFO, "\t└── refinement: %s", f"FedProx mu={self.proximal_mu}" if self.proximal_mu else "FedAvg")

    # ---- messages -----------------------------------------------------------------------

    def _nodes(self, grid: Grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.num_nodes:
            log(WARNING, "only %d of %d nodes connected", len(nodes), self.num_nodes)
        return nodes

    def _messages(self, grid: Grid, content: RecordDict, message_type: str) -> list[Message]:
        return [
            Message(content=content, dst_node_id=node, message_type=message_type)
            for node in self._nodes(grid)
        ]

    def exchange(self, grid: Grid, config: ConfigRecord):
        """The Phase-1 exchange over Flower messages (see ``strategies.coarse_init``)."""

        def run(step: str, request: Params, reduce: str) -> dict[str, np.ndarray]:
            cfg = ConfigRecord({**dict(config), "step": step, "reduce": reduce})
            content = RecordDict({"request": params_to_record(request), "config": cfg})
            replies = grid.send_and_receive(self._messages(grid, content, COARSE_ACTION), timeout=self.timeout)
            return self._reduce_coarse(replies, reduce, step)

        return run

    def _reduce_coarse(self, replies: Iterable[Message], reduce: str, step: str) -> dict[str, np.ndarray]:
        """The statistics of the nodes that answered; a failed node is left out and named
        in Phase 1's warnings (too few anchors left is Phase 1's own error)."""
        parts = []
        for msg in replies:
            if msg.has_error():
                self.coarse_dropped.append(
                    f"step {step!r}: node {msg.metadata.src_node_id} left out: {msg.error.reason}")
                log(WARNING, "Phase 1 %s", self.coarse_dropped[-1])
                continue
            parts.append(record_to_params(msg.content["stats"]))
        return reduce_coarse(parts, reduce)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.coarse_init is not None and self.coarse is None:
            self.coarse_dropped: list[str] = []
            self.coarse = self.coarse_init.estimate(self.exchange(grid, config))
            self.coarse.warnings.extend(self.coarse_dropped)
            for warning in self.coarse.warnings:
                log(WARNING, "Phase 1: %s", warning)
            arrays = params_to_record(unflatten(self.coarse.centres, record_to_params(arrays)))
        self.sent_models = record_to_params(arrays)
        cfg = ConfigRecord(
            {
                **dict(config),
                "server-round": server_round,
                "k-models": self.k,
                "selection": self.selection,
                "reply": self.reply,
                "proximal-mu": self.proximal_mu,
            }
        )
        content = RecordDict({"arrays": arrays, "config": cfg})
        return self._messages(grid, content, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.sent_models is not None, "configure_train must run first"
        self.last_report = report = RoundReport()
        models = self.sent_models

        def decode(content: RecordDict):
            conf = decode_confusion(content, None)
            if "sums" in content:
                return decode_sums(content["sums"], models), None, conf
            return None, decode_clustered_batch(content, models), conf

        decoded = decode_replies(replies, decode, report)
        parts = [d[0] for d in decoded if d[0] is not None]
        batches = [d[1] for d in decoded if d[1] is not None]
        confusion = sum_confusion([d[2] for d in decoded], report)
        try:
            total = aggregate_results(batches, parts, self.k)
        except MalformedBatch as err:  # two nodes claimed one client: trust neither
            report.dropped.append(f"all per-client replies: {err}")
            total = combine(parts)
        log_dropped(report)
        report.confusion = confusion
        if total is None or total.examples.sum() == 0:
            return None, None
        report.clients = int(total.clients.sum())
        report.examples = int(total.examples.sum())
        report.cluster_sizes = total.clients.tolist()
        report.metrics = {"loss-before": float(dd_value(total.loss).sum() / total.examples.sum())}
        new = cluster_means(total, self.sent_models)
        return params_to_record(new), MetricRecord(report.metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent_models = record_to_params(arrays)
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "k-models": self.k,
                            "selection": self.selection})
        return self._messages(grid, RecordDict({"arrays": arrays, "config": cfg}), MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.last_report = report = RoundReport()

        def decode(content: RecordDict):
            try:
                a = record_to_params(content["eval"])
                n, part = int(a["examples"][0]), (a["loss.hi"], a["loss.lo"])
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise MalformedBatch(f"missing or unreadable evaluation: {err}") from None
            if n < 0 or not (np.isfinite(part[0]).all() and np.isfinite(part[1]).all()):
                raise MalformedBatch("negative count or non-finite loss")
            return n, part, decode_confusion(content, None)

        decoded = decode_replies(replies, decode, report)
        log_dropped(report)
        examples = sum(d[0] for d in decoded)
        loss = None
        for _, part, _ in decoded:
            loss = part if loss is None else dd_add(loss, part)
        confusion = sum_confusion([d[2] for d in decoded], report)
        report.confusion = confusion
        if not examples:
            return None
        report.metrics = {"loss": float(dd_value(loss).sum() / examples)}
        return MetricRecord(report.metrics)


def sum_confusion(parts: list[np.ndarray | None], report: RoundReport) -> np.ndarray | None:
    """Add the cohorts' confusion counts (telemetry only: a mismatched one is left out and
    noted, the models are unaffected)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    total = np.zeros_like(present[0])
    for p in present:
        if p.shape != total.shape:
            report.dropped.append(f"confusion counts of shape {p.shape} ignored")
            continue
        total += p
    return total


def unflatten(rows: np.ndarray, reference: Params) -> Params:
    """(k, P) flattened models -> named arrays stacked on the model axis, as ``reference``."""
    out, offset = {}, 0
    for name, ref in reference.items():
        shape = ref.shape[1:]
        size = int(np.prod(shape))
        out[name] = rows[:, offset:offset + size].reshape(len(rows), *shape)
        offset += size
    return out

