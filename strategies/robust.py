"""Flower's robust aggregators (FedMedian, FedTrimmedAvg, Krum, MultiKrum) and norm
clipping, for cohort replies.

Flower's strategies aggregate one model per reply; a cohort reply carries a batch of
virtual clients. ``PerClient`` validates the cohort replies as FedAvg does, then hands
Flower's own ``aggregate_train`` one Flower-style reply per client, so the statistics are
Flower's, not re-written here. Each round reports which clients the aggregator set aside
(``flags``): those Krum/MultiKrum did not select, those whose update norm was clipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

from proto.wire import CLUSTER, LOSS_BEFORE, ClientBatch, params_to_record, record_to_params
from strategies.fedavg import CohortAggregation
from strategies.result import RoundResult

TRAIN_LOSS = "train_loss"  # Flower's default train_loss_key (QFedAvg)


def client_replies(batch: ClientBatch) -> list[Message]:
    """One Flower-style reply per client: ``arrays``, and ``metrics`` with ``num-examples``,
    the client's mean loss under the model it received (``train_loss``, as Flower's QFedAvg
    reads it) and, with client-side clipping, ``norm_bit`` (Flower's DP wrappers read it)."""
    n = batch.num_examples
    means = {TRAIN_LOSS if name == LOSS_BEFORE else name: values / n
             for name, values in batch.metrics.items() if name != CLUSTER}
    return [
        Message(RecordDict({
            "arrays": params_to_record({name: v[j] for name, v in batch.params.items()}),
            "metrics": MetricRecord({"num-examples": int(n[j]),
                                     **{name: (int(round(v[j])) if name == "norm_bit" else float(v[j]))
                                        for name, v in means.items()}}),
        }), dst_node_id=0, message_type="train")
        for j in range(len(batch))
    ]


class PerClient(CohortAggregation):
    """Mixin: Flower's ``aggregate_train`` of the next class, on one reply per client."""

    def combine(self, server_round: int, batch: ClientBatch, result: RoundResult) -> ArrayRecord | None:
        result.defense.participants = batch.client_ids.tolist()
        batch = self.before_aggregation(batch, result)
        return self.flower_aggregate_train(server_round, client_replies(batch))

    def before_aggregation(self, batch: ClientBatch, result: RoundResult) -> ClientBatch:
        return batch


class CohortFedMedian(PerClient, FedMedian):
    """Flower's coordinate-wise median (Yin et al. 2018)."""


class CohortFedTrimmedAvg(PerClient, FedTrimmedAvg):
    """Flower's trimmed mean (Yin et al. 2018): ``beta`` of each tail cut per coordinate."""


class KrumFlags(PerClient):
    """Krum/MultiKrum: the clients left out of the selection are the flagged ones."""

    def before_aggregation(self, batch: ClientBatch, result: RoundResult) -> ClientBatch:
        contents = [m.content for m in client_replies(batch)]
        chosen = select_multikrum(contents, self.num_malicious_nodes,
                                  getattr(self, "num_nodes_to_select", 1))
        kept = {id(c) for c in chosen}
        result.defense.flags = {"krum": sorted(int(c) for c, content in zip(batch.client_ids, contents)
                                       if id(content) not in kept)}
        return batch


class CohortKrum(KrumFlags, Krum):
    """Flower's Krum (Blanchard et al. 2017): the one update closest to its neighbours."""


class CohortMultiKrum(KrumFlags, MultiKrum):
    """Flower's MultiKrum: the average of the ``num_nodes_to_select`` best Krum scores."""


class CohortFedAvgClip(PerClient, FedAvg):
    """FedAvg of updates clipped to ``clipping_norm`` (Flower's own clipping function,
    without noise): bounds what any one client can move the model in a round."""

    def __init__(self, clipping_norm: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clipping_norm = clipping_norm

    def before_aggregation(self, batch: ClientBatch, result: RoundResult) -> ClientBatch:
        current = list(record_to_params(self.sent).values())
        names = list(batch.params)
        clipped = {n: np.empty_like(batch.params[n]) for n in names}
        flagged = []
        for j, client in enumerate(batch.client_ids):
            arrays = [np.asarray(batch.params[n][j], np.float64) for n in names]
            if get_norm([a - c for a, c in zip(arrays, current)]) > self.clipping_norm:
                flagged.append(int(client))
            compute_clip_model_update(arrays, current, self.clipping_norm)
            for n, a in zip(names, arrays):
                clipped[n][j] = a
        result.defense.flags = {"clipping": flagged}
        return ClientBatch(batch.client_ids, batch.num_examples, clipped, batch.metrics)


ROBUST = {
    "fedmedian": CohortFedMedian,
    "fedtrimmedavg": CohortFedTrimmedAvg,
    "krum": CohortKrum,
    "multikrum": CohortMultiKrum,
    "fedavg-clip": CohortFedAvgClip,
}
