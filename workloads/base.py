"""The workload contract: what a client runs, independent of Flower and of the strategy.

A workload owns a data source, a model, local training and local evaluation. Every method
works on a *cohort*: a batch of virtual clients handled in one call (a batch of one is the
device case). Parameters are an ordered ``dict[str, np.ndarray]`` (the shape of a Flower
``ArrayRecord``); per-client results are stacked along a leading client axis.

Strategies never see a workload; the client app calls it, the server asks it only for the
initial parameters and for central metrics (e.g. the distance to a known ground truth).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np

from workloads.federation import STREAM_INIT

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class ConfigField:
    """One key of a scenario section: its type, default and constraint.

    ``check`` returns an error text (``"must be > 0"``) or ``None`` when the value is fine.
    ``default=REQUIRED`` makes the key mandatory.
    """

    kind: type | tuple[type, ...]
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[Any, ...] | None = None


REQUIRED = object()


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


class CohortData(Protocol):
    """Local data of a cohort of virtual clients."""

    client_ids: np.ndarray  # (B,) int64, sorted
    num_examples: np.ndarray  # (B,) int64, every entry >= 1


@dataclass(frozen=True)
class TrainSettings:
    """Local-training knobs sent by the server each round.

    ``proximal_mu > 0`` asks for FedProx: the local objective gains (mu/2)||w - w_start||^2.
    """

    local_steps: int
    lr: float
    proximal_mu: float = 0.0
    server_round: int = 0  # seeds per-round randomness of local training (e.g. minibatch order)


class Workload(ABC):
    """A method's client side: data, model, local train, local loss and evaluate.

    Instances keep the scenario's ``federation`` table (seed, participation, dropout) as
    ``self.federation`` and the number of clients as ``self.num_clients``. Subclasses declare ``name`` (the ``run.workload`` value), ``section`` (their scenario
    table) with ``schema`` (its keys), ``key_metric`` (the metric plotted by default) and
    ``loss_name`` (the record's name for the mean local loss, e.g. ``mse``).
    """

    name: ClassVar[str]
    section: ClassVar[str]
    schema: ClassVar[dict[str, ConfigField]]
    key_metric: ClassVar[str]
    loss_name: ClassVar[str] = "loss"  # how the run record names the mean local loss
    higher_is_better: ClassVar[bool] = False  # direction of ``key_metric``
    curve_x: ClassVar[str | None] = None  # axis label to plot the key metric against examples used
    single_model: ClassVar[bool] = False  # True: trains one global model (no k-model strategies)
    summary_metrics: ClassVar[tuple[str, ...]] = ()  # more final-round metrics for the summary table
    plot_metrics: ClassVar[tuple[str, ...]] = ()  # more per-round metrics plotted (<metric>.png)

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """Cross-field checks over the whole scenario: a list of (dotted field, message)."""
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """Reference runs outside the federation, as scenario overrides by name (e.g. one
        client holding all data); the launcher runs them in-process after the simulation."""
        return {}

    @classmethod
    def memory_estimate(cls, scenario: dict[str, dict[str, Any]], actors: int) -> float | None:
        """Expected peak bytes of a simulation with ``actors`` Ray workers, all processes
        (None: no estimate). The launcher warns when it exceeds the available memory."""
        return None

    def variants(self) -> tuple[str, ...]:
        """Arms compared within every strategy (e.g. active-learning selection rules), each
        run on the same federation and seed; ``("",)``: the workload has none."""
        return ("",)

    @abstractmethod
    def client_data(self, client_ids: np.ndarray) -> CohortData:
        """Local data of the given virtual clients (deterministic in seed and client id)."""

    @abstractmethod
    def initial_parameters(self) -> Params:
        """Parameters of one model before any training (deterministic in the seed)."""

    def random_models(self, k: int, seed: int) -> Params:
        """k random models stacked on a model axis (IFCA's start, ``clustered.init =
        "random"``). Default: N(0, I/size) per array, the scale of a unit-norm linear model;
        neural workloads override it with draws of their own initialisation."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_INIT]))
        return {n: rng.standard_normal((k, *v.shape)) / np.sqrt(v.size)
                for n, v in self.initial_parameters().items()}

    @abstractmethod
    def local_loss(self, params: Params, data: CohortData) -> np.ndarray:
        """Mean local loss of every client of the cohort under ``params``: shape (B,)."""

    def local_losses(self, models: Params, data: CohortData) -> np.ndarray:
        """(B, k): every client's mean loss under each of k models (stacked on axis 0).
        Override when one pass over the data can score all models at once."""
        k = len(next(iter(models.values())))
        return np.stack(
            [self.local_loss({n: v[j] for n, v in models.items()}, data) for j in range(k)], axis=1
        )

    @abstractmethod
    def local_train(self, start: Params, data: CohortData, settings: TrainSettings) -> Params:
        """Train each client from its own start (arrays stacked on a leading (B,) axis).

        Returns the trained parameters, stacked the same way.
        """

    @abstractmethod
    def subset(self, data: CohortData, index: np.ndarray) -> CohortData:
        """The cohort data of the clients at positions ``index`` (e.g. this round's active ones)."""

    def local_evaluate(self, params: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Per-client metric *sums* over each client's examples (mean = sum / n)."""
        return {"loss": self.local_loss(params, data) * data.num_examples}

    # ---- state kept by a cohort across rounds (stateless workloads keep the defaults) ----

    def initial_state(self, data: CohortData) -> Params | None:
        """What a cohort must remember between rounds (e.g. which samples are labeled), as
        arrays; ``None``: the workload is stateless."""
        return None

    def with_state(self, data: CohortData, state: Params) -> CohortData:
        """The data the cohort trains and is evaluated on under ``state``."""
        return data

    def update_state(
        self, model: Params, data: CohortData, state: Params, round_: int, variant: str,
        active: np.ndarray,
    ) -> tuple[Params, dict[str, np.ndarray]]:
        """At the start of a round, with the one model received: the new state and per-client
        metric sums (shape (B,)); ``active`` marks the clients taking part this round."""
        return state, {}

    # ---- attacks and defenses (simulation only; honest workloads keep the defaults) ------

    def malicious_clients(self, variant: str) -> np.ndarray:
        """Ids of the clients that attack in this arm: the server scores each defense's
        flags against them (true and false positive rates); strategies never see them."""
        return np.empty(0, np.int64)

    def evaluation_probe(self, data: CohortData, state: Params | None, variant: str) -> Params | None:
        """What a simulated attacker reveals to the evaluator with its reply (e.g. its
        trigger, to measure attack success); never aggregated. None: nothing."""
        return None

    def observe_probes(self, probes: list[Params]) -> None:
        """The server-side workload receives the round's probes before its central metrics."""

    def coarse_statistics(self, step: str, request: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Statistics for a coarse-estimate (Phase 1) step of a clustered strategy.

        Returns per-client arrays with a leading client axis, including ``client-id``; the
        step decides whether they are summed over clients or sent as rows (anchors). Raw data
        never leave the client. Every trainable workload answers ``anchor-train`` (below);
        workloads add their own steps (e.g. moments of linear models).
        """
        if step == ANCHOR_TRAIN:
            return self.anchor_models(request, data)
        raise ValueError(f"workload {self.name!r} has no coarse-estimate step {step!r}")

    def is_anchor(self, client_ids: np.ndarray) -> np.ndarray:
        """Anchor clients are ids ``0 .. anchors.count - 1`` (``self.anchor_count``)."""
        return np.asarray(client_ids) < getattr(self, "anchor_count", 0)

    def anchor_models(self, request: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Phase 1 for any trainable model: each anchor trains ``request["steps"]`` local steps
        (step size ``request["lr"]``) from the common start ``request["start"]`` (flattened)
        and sends its model, flattened, as a row; the server clusters the rows."""
        index = np.flatnonzero(self.is_anchor(data.client_ids))
        reference = self.initial_parameters()
        start, offset = {}, 0
        flat = np.asarray(request["start"], dtype=np.float64).ravel()
        for name, value in reference.items():
            start[name] = flat[offset:offset + value.size].reshape(value.shape).astype(value.dtype)
            offset += value.size
        if offset != flat.size:
            raise ValueError(f"anchor-train start has {flat.size} values; the model has {offset}")
        if len(index) == 0:
            return {"client-id": np.empty(0, np.int64), "estimate": np.empty((0, offset))}
        anchors = self.subset(data, index)
        settings = TrainSettings(int(np.sum(request["steps"])), float(np.sum(request["lr"])))
        trained = self.local_train(stack_params(start, len(index)), anchors, settings)
        rows = np.concatenate([np.asarray(trained[n], np.float64).reshape(len(index), -1) for n in reference], axis=1)
        return {"client-id": anchors.client_ids, "estimate": rows}

    @property
    def num_clusters(self) -> int:
        """k for the k-model strategies (1: the workload has no cluster structure)."""
        return 1

    def true_parameters(self) -> Params | None:
        """The true models stacked on a model axis, when known (synthetic data)."""
        return None

    def central_metrics(
        self, models: Params, confusion: np.ndarray | None = None
    ) -> dict[str, float]:
        """Server-side metrics of the current model(s), stacked on a leading model axis.

        ``confusion`` (chosen cluster x true cluster x size bucket, client counts) comes from
        clients that know their true cluster (synthetic data) and yields misclustering rates.
        Empty when there is no ground truth.
        """
        return {}

    def final_report(self, models: Params) -> dict[str, Any]:
        """JSON-ready extras on the final models for the run record's figures (e.g. a rollout
        error curve, a predicted field); empty by default."""
        return {}

    # -- device data files (deployment): one client per file, see workloads.device_files --
    device_format: ClassVar[str] = ""  # the file format, documented; "" when there is none

    def device_files(self, data: CohortData) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Each client of a cohort as (client id, the arrays of its device file)."""
        raise NotImplementedError(f"the {self.name} workload has no device data format yet")

    def read_device_files(self, files: list[Any]) -> CohortData:
        """A device's cohort from its client files; raises ``DeviceDataError`` naming the
        file and the problem (missing, truncated, wrong shape, not this scenario's)."""
        from workloads.device_files import DeviceDataError

        raise DeviceDataError(f"the {self.name} workload has no device data format yet")


ANCHOR_TRAIN = "anchor-train"  # the generic Phase-1 step (``Workload.anchor_models``)

# Client-size buckets for misclustering: 1, 2, 3-10 and over 10 points.
SIZE_BUCKETS = ("n1", "n2", "n3_10", "n11plus")


def size_bucket(num_examples: np.ndarray) -> np.ndarray:
    return np.digitize(num_examples, [2, 3, 11])


def stack_params(params: Params, batch: int) -> Params:
    """Broadcast one model to a batch of clients (a copy per client, ready to train)."""
    return {k: np.repeat(v[None], batch, axis=0) for k, v in params.items()}
