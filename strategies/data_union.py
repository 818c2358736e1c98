"""Aggregating data summaries instead of weights: the server trains on the union.

Clients upload small synthetic datasets (e.g. distilled images with their labels); the
server checks every upload against what it announced, drops and names the bad ones, and
hands the union of the rest to a trainer (the workload's ``server_train``), which returns
the new global model and, per defense, the clients it flags.

The checks and the union are pure numpy (``check_upload``, ``union``); ``DataUnion`` is a
thin layer over Flower's ``FedAvg`` (sampling and messages are Flower's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from proto.wire import (
    METRIC_PREFIX, ClientBatch, MalformedBatch, Params, params_to_record, record_to_params, validate_batch,
)
from strategies.fedavg import CohortAggregation, decode_replies, unshared
from strategies.result import RoundResult

# (images, labels, owner client id per image, round) -> (global model, flagged clients per defense)
Trainer = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[Params, dict[str, list[int]]]]


@dataclass(frozen=True)
class UploadTrainer:
    """What ``data-union`` needs from the server side: the trainer, the shapes announced for
    one client's upload (``images``, ``labels``) and the number of label classes."""

    train: Trainer
    announced: dict[str, tuple[int, ...]]
    num_classes: int


def check_upload(
    images: np.ndarray, labels: np.ndarray, announced: dict[str, tuple[int, ...]], num_classes: int
) -> str | None:
    """What is wrong with one client's upload (None: nothing). ``announced`` holds the
    shapes the server announced for ``images`` and ``labels``."""
    want_images, want_labels = tuple(announced["images"]), tuple(announced["labels"])
    if images.ndim == len(want_images) and images.shape[1:] == want_images[1:] and images.shape[0] > want_images[0]:
        return (f"upload of {images.shape[0]} images is larger than the {want_images[0]} announced "
                f"({images.nbytes} bytes)")
    if images.shape != want_images:
        return f"images of shape {images.shape}, expected {want_images}"
    if labels.shape != want_labels:
        return f"labels of shape {labels.shape}, expected {want_labels}"
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        return "labels are not integers"
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        return f"labels out of range ({labels.min()}..{labels.max()}; classes are 0..{num_classes - 1})"
    if not np.isfinite(images).all():
        return f"{int((~np.isfinite(images)).sum())} non-finite pixel values"
    return None


def union(uploads: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The uploads of (client id, images, labels), in client-id order, as (images, labels,
    owner of each image): the result does not depend on the order replies arrived in."""
    uploads = sorted(uploads, key=lambda u: u[0])
    images = np.concatenate([u[1] for u in uploads]).astype(np.float32)
    labels = np.concatenate([u[2] for u in uploads]).astype(np.int64)
    owners = np.concatenate([np.full(len(u[2]), u[0], np.int64) for u in uploads])
    return images, labels, owners


def decode_uploads(content: RecordDict) -> ClientBatch:
    """A cohort's uploads (per client: ``images``, ``labels``), unchecked beyond the client ids."""
    try:
        clients = record_to_params(content["clients"])
        ids, counts = clients.pop("client-id"), clients.pop("num-examples")
        params = record_to_params(content["arrays"])
        images, labels = params["images"], params["labels"]
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedBatch(f"missing or unreadable upload: {err}") from None
    metrics = {k.removeprefix(METRIC_PREFIX): v for k, v in clients.items() if k.startswith(METRIC_PREFIX)}
    batch = ClientBatch(ids, counts, {"images": images, "labels": labels}, metrics)
    validate_batch(batch, None)
    if len(images) != len(ids) or len(labels) != len(ids):
        raise MalformedBatch(f"{len(ids)} clients but uploads for {len(images)} / {len(labels)}")
    return batch


class DataUnion(CohortAggregation, FedAvg):
    """Flower's FedAvg sampling; the global model is trained on the union of the uploads."""

    def __init__(self, uploads: UploadTrainer, **nodes: Any) -> None:
        super().__init__(**nodes)
        self.trainer, self.announced, self.num_classes = uploads.train, uploads.announced, uploads.num_classes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), "upload-images": int(self.announced["images"][0])})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        result = RoundResult(sent=self.sent, k_models=False)
        uploads = self.checked_uploads(unshared(decode_replies(replies, decode_uploads, result), result), result)
        result.log_dropped()
        if not uploads:
            return result
        images, labels, owners = union(uploads)
        params, flags = self.trainer(images, labels, owners, server_round)
        result.clients, result.examples = len(uploads), len(labels)
        result.defense.flags = {name: sorted(int(c) for c in clients) for name, clients in flags.items()}
        result.defense.participants = sorted(u[0] for u in uploads)
        result.arrays = params_to_record(params)
        return result

    def checked_uploads(self, batches: list[ClientBatch], result: RoundResult) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Every client's (id, images, labels) that passes ``check_upload``; the others are
        dropped and named, and counted as ``rejected_uploads``."""
        uploads, rejected = [], 0
        for batch in batches:
            for j, client in enumerate(batch.client_ids.tolist()):
                images, labels = batch.params["images"][j], batch.params["labels"][j]
                problem = check_upload(images, labels, self.announced, self.num_classes)
                if problem is None:
                    uploads.append((client, images, labels))
                else:
                    rejected += 1
                    result.dropped.append(f"client {client}: {problem}")
        result.counts["rejected_uploads"] = rejected
        return uploads
