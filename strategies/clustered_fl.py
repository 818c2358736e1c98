"""``ClusteredStrategy``: a Flower ``Strategy`` for k models over cohorts of clients.

One class, configured three ways (see ``strategies.build_strategy``):
- the clustered mixed-regression algorithm (Su, Xu, Yang 2022): Phase 1 (a ``CoarseInit``)
  runs inside the first ``configure_train``, replacing the models handed in; then every round
  each client picks its min-loss model and refines it with FedAvg steps or FedProx;
- IFCA (Ghosh et al. 2020): the same rounds from the models handed in, without Phase 1
  (``update = "official"``: the authors' divisor);
- the oracle: every client uses its true cluster (synthetic data only).

It works under Flower's own ``Strategy.start`` as well as under umbel's round engine, and
threads the k models from round to round as one ``ArrayRecord`` (each array stacked on a
leading model axis). All arithmetic is in ``strategies.clustered`` (pure numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from proto.exact_sum import dd_add, dd_value
from proto.wire import (
    CLUSTER,
    COARSE_ACTION,
    NORMAL_CONSTANT,
    NORMAL_MATRIX,
    NORMAL_VECTOR,
    MalformedBatch,
    Params,
    decode_clustered_batch,
    decode_confusion,
    decode_sums,
    params_to_record,
    record_to_params,
)
from strategies.aggregation import merge_batches
from strategies.clustered import (
    aggregate_results, cluster_least_squares, cluster_means, flat_models, official_means, server_step,
    soft_least_squares, unflatten,
)
from strategies.coarse_init import CoarseInit, CoarseInitError, CoarseResult, reduce_coarse
from strategies.fedavg import decode_replies, unshared
from strategies.result import ReportingStrategy, RoundResult


class ClusteredStrategy(ReportingStrategy):
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
        rule: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        refine: str = "first-order",
        ridge: float = 1e-6,
        update: str = "mean",
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        assignment: str = "hard",
    ) -> None:
        """``rule``: each cluster's aggregation over its clients' flattened models and
        example counts (``strategies.aggregation``: median, trimmed mean, Krum, or yours);
        None: the example-weighted mean (exact sums, any reply form).
        ``refine``: ``first-order`` (clients train; the cluster's new model is the rule's,
        or IFCA's official update with ``update = "official"``, then a server step of
        ``server_lr`` with ``server_momentum``) or ``second-order`` (clients send normal
        equations; each cluster's least squares, ``ridge`` towards its previous model).
        ``assignment = "soft"`` (second order, per-client replies): each client counts in
        every cluster by its posterior weight, one EM step a round (``soft_least_squares``)."""
        if assignment == "soft" and (refine != "second-order" or reply != "clients"):
            raise ValueError("soft assignments need refine = \"second-order\" and reply = \"clients\"")
        self.rule, self.refine, self.ridge, self.update = rule, refine, ridge, update
        self.assignment = assignment
        self.mixture = None  # soft assignments: (noise variance, cluster weights), kept across rounds
        self.server_lr, self.server_momentum = server_lr, server_momentum
        self.velocity: Params | None = None  # the server step's momentum, per cluster model
        self.k, self.num_nodes, self.selection = k, num_nodes, selection
        self.coarse_init, self.proximal_mu, self.reply = coarse_init, proximal_mu, reply
        self.timeout = timeout
        self.coarse: CoarseResult | None = None
        self.phase1_warnings: list[str] | None = None  # reported once, with the round Phase 1 ran in
        self.sent: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├── k = %d, selection %s, replies as %s", self.k, self.selection, self.reply)
        log(INFO, "\t├── Phase 1: %s", self.coarse_init.name if self.coarse_init else "none")
        log(INFO, "\t└── refinement: %s", self.describe_refinement())

    def describe_refinement(self) -> str:
        if self.refine == "second-order":
            soft = ", soft assignments (EM)" if self.assignment == "soft" else ""
            return f"second-order (per-cluster least squares, ridge {self.ridge:g}{soft})"
        local = f"FedProx mu={self.proximal_mu}" if self.proximal_mu else "FedAvg"
        if self.update == "official":
            local += " (IFCA's official update)"
        if self.server_lr != 1.0 or self.server_momentum:
            local += f", server step {self.server_lr:g} with momentum {self.server_momentum:g}"
        return local

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

    def exchange(self, grid: Grid, config: ConfigRecord, dropped: list[str]):
        """The Phase-1 exchange over Flower messages (see ``strategies.coarse_init``); a
        failed node is left out and named in ``dropped`` (too few anchors left is Phase 1's
        own error)."""

        def run(step: str, request: Params, reduce: str) -> dict[str, np.ndarray]:
            cfg = ConfigRecord({**dict(config), "step": step, "reduce": reduce})
            content = RecordDict({"request": params_to_record(request), "config": cfg})
            replies = grid.send_and_receive(self._messages(grid, content, COARSE_ACTION), timeout=self.timeout)
            parts = []
            for msg in replies:
                if msg.has_error():
                    dropped.append(f"step {step!r}: node {msg.metadata.src_node_id} left out: {msg.error.reason}")
                    log(WARNING, "Phase 1 %s", dropped[-1])
                    continue
                parts.append(record_to_params(msg.content["stats"]))
            return reduce_coarse(parts, reduce)

        return run

    def run_phase1(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> ArrayRecord:
        """Phase 1 (once): the coarse estimates replace the models handed in."""
        dropped: list[str] = []
        try:
            self.coarse = self.coarse_init.estimate(self.exchange(grid, config, dropped))
        except CoarseInitError as err:  # say which nodes failed, and why (e.g. a bad device file)
            if not dropped:
                raise
            raise CoarseInitError(f"{err}. Left out of Phase 1: " + "; ".join(dropped)) from None
        self.coarse.warnings.extend(dropped)
        for warning in self.coarse.warnings:
            log(WARNING, "Phase 1: %s", warning)
        self.phase1_warnings = self.coarse.warnings
        return params_to_record(unflatten(self.coarse.centres, record_to_params(arrays)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.coarse_init is not None and self.coarse is None:
            arrays = self.run_phase1(arrays, config, grid)
        self.sent = arrays
        cfg = ConfigRecord(
            {
                **dict(config),
                "server-round": server_round,
                "k-models": self.k,
                "selection": self.selection,
                "reply": self.reply,
                "proximal-mu": self.proximal_mu,
                "refine": self.refine,
                "assignment": self.assignment,
            }
        )
        content = RecordDict({"arrays": arrays, "config": cfg})
        return self._messages(grid, content, MessageType.TRAIN)

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        assert self.sent is not None, "configure_train must run first"
        result = RoundResult(sent=self.sent, k_models=True, phase1_warnings=self.phase1_warnings)
        self.phase1_warnings = None
        models = record_to_params(self.sent)
        expected = models if self.refine == "first-order" else normal_equations_shapes(models, self.assignment)

        def decode(content: RecordDict):
            conf = decode_confusion(content, None)
            if "sums" in content and self.assignment == "soft":
                raise MalformedBatch("soft assignments need every client's normal equations; this cohort sent sums")
            if "sums" in content:
                return decode_sums(content["sums"], expected), None, conf
            return None, decode_clustered_batch(content, expected), conf

        decoded = decode_replies(replies, decode, result)
        result.telemetry.confusion = sum_confusion([d[2] for _, d in decoded], result)
        batches = unshared([(node, d[1]) for node, d in decoded if d[1] is not None], result)
        total = aggregate_results(batches, [d[0] for _, d in decoded if d[0] is not None], self.k)
        result.log_dropped()
        if total is None or total.examples.sum() == 0:
            return result
        result.clients, result.examples = int(total.clients.sum()), int(total.examples.sum())
        result.cluster_clients = total.clients.tolist()
        result.metrics = {"loss-before": float(dd_value(total.loss).sum() / total.examples.sum())}
        result.arrays = params_to_record(self.new_models(total, batches, models))
        return result

    def new_models(self, total, batches, models: Params) -> Params:
        """The round's models from its sums (and, for a robust rule, its per-client batches)."""
        if self.refine == "second-order" and self.assignment == "soft":
            new, self.mixture = soft_least_squares(merge_batches(batches), models, self.ridge, self.mixture)
            return new
        if self.refine == "second-order":
            return cluster_least_squares(total, models, self.ridge)
        if self.rule is not None:
            averaged = per_cluster(merge_batches(batches), models, self.rule)
        elif self.update == "official":
            averaged = official_means(total, models)
        else:
            averaged = cluster_means(total, models)
        if self.server_lr == 1.0 and self.server_momentum == 0.0:
            return averaged
        new, self.velocity = server_step(models, averaged, self.velocity, self.server_lr, self.server_momentum,
                                         total.examples == 0)
        return new

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "k-models": self.k,
                            "selection": self.selection})
        return self._messages(grid, RecordDict({"arrays": arrays, "config": cfg}), MessageType.EVALUATE)

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        result = RoundResult(sent=self.sent, k_models=True)
        decoded = [d for _, d in decode_replies(replies, decode_evaluation, result)]
        result.log_dropped()
        result.telemetry.confusion = sum_confusion([d[2] for d in decoded], result)
        examples = sum(d[0] for d in decoded)
        if examples:
            loss = decoded[0][1]
            for _, part, _ in decoded[1:]:
                loss = dd_add(loss, part)
            result.metrics = {"loss": float(dd_value(loss).sum() / examples)}
        return result


def decode_evaluation(content: RecordDict) -> tuple[int, tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """A cohort's evaluation: (examples, loss sum as a double-double, confusion or None)."""
    try:
        a = record_to_params(content["eval"])
        n, part = int(a["examples"][0]), (a["loss.hi"], a["loss.lo"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise MalformedBatch(f"missing or unreadable evaluation: {err}") from None
    if n < 0 or not (np.isfinite(part[0]).all() and np.isfinite(part[1]).all()):
        raise MalformedBatch("negative count or non-finite loss")
    return n, part, decode_confusion(content, None)


def sum_confusion(parts: list[np.ndarray | None], result: RoundResult) -> np.ndarray | None:
    """Add the cohorts' confusion counts (telemetry only: a mismatched one is left out and
    noted, the models are unaffected)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    total = np.zeros_like(present[0])
    for p in present:
        if p.shape != total.shape:
            result.dropped.append(f"confusion counts of shape {p.shape} ignored")
            continue
        total += p
    return total


def per_cluster(batch, previous: Params, rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Params:
    """Each cluster's new model by ``rule`` over the clients that chose it (flattened, in
    client-id order); an empty cluster keeps its model."""
    rows = flat_models(previous)
    if batch is not None:
        choice = batch.metrics[CLUSTER].astype(np.int64)
        flat = np.concatenate([np.asarray(batch.params[n], np.float64).reshape(len(batch), -1)
                               for n in previous], axis=1)
        for j in range(len(rows)):
            chose = choice == j
            if chose.any():
                rows[j] = rule(flat[chose], batch.num_examples[chose].astype(np.float64))
    return unflatten(rows, previous)


def normal_equations_shapes(models: Params, assignment: str = "hard") -> Params:
    """What a second-order reply carries per cluster: a P x P normal matrix and a P-vector
    (and, for soft assignments, the constant y'y/n)."""
    k, size = len(next(iter(models.values()))), sum(v[0].size for v in models.values())
    shapes = {NORMAL_MATRIX: np.zeros((k, size, size)), NORMAL_VECTOR: np.zeros((k, size))}
    return shapes | ({NORMAL_CONSTANT: np.zeros(k)} if assignment == "soft" else {})
