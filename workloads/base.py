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
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import numpy as np

from workloads import streams
from workloads.device_files import truth_path

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


def some_of(allowed: tuple[str, ...], noun: str, article: str = "a", empty_ok: bool = False):
    """A validator of a list naming at least one of ``allowed`` (none, with ``empty_ok``), each once."""
    def check(v: list) -> str | None:
        if not v and not empty_ok:
            return f"must name at least one {noun}"
        unknown = [a for a in v if a not in allowed]
        if unknown:
            return f"unknown {noun} {unknown[0]!r}; expected some of {list(allowed)}"
        return f"names {article} {noun} twice" if len(set(v)) != len(v) else None
    return check


class CohortData(Protocol):
    """Local data of a cohort of virtual clients."""

    client_ids: np.ndarray  # (B,) int64, sorted
    num_examples: np.ndarray  # (B,) int64, every entry >= 1


@dataclass(frozen=True, kw_only=True)  # built from scenario tables: keywords only
class TrainSettings:
    """Local-training knobs sent by the server each round.

    ``proximal_mu > 0`` asks for FedProx: the local objective gains (mu/2)||w - w_start||^2.
    ``variant`` is the arm's workload variant (``Workload.variants``), for workloads whose
    arms differ in local training under any strategy (``Stateful`` holds one model only).
    """

    local_steps: int
    lr: float
    proximal_mu: float = 0.0
    step_cap: float = 0.5  # each client's step <= step_cap / its loss's largest curvature; 0: none
    server_round: int = 0  # seeds per-round randomness of local training (e.g. minibatch order)
    variant: str = ""  # the arm's variant ("" when the workload has none, and in Phase 1)


class Workload(ABC):
    """The core every workload implements: a method's client side, data to evaluation.

    Abstract (must implement): ``client_data``, ``initial_parameters``, ``local_loss``,
    ``local_train``, ``subset``. Declared as class attributes: ``name`` (the ``run.workload``
    value), ``section`` (its scenario table) with ``schema`` (the table's keys),
    ``key_metric`` (the metric plotted and shown live), ``loss_name`` (the record's name for
    the mean local loss) and ``higher_is_better`` (direction of ``key_metric``).

    ``__init__(scenario)`` receives the client view of the scenario (``run``, ``federation``,
    ``anchors`` and the workload's own table) and calls ``super().__init__(scenario)``, which
    keeps ``federation``, ``seed``, ``num_clients``, ``anchor_ids`` (sorted; ``anchor_count``
    of them), ``data_folder`` (the scenario's ``data.folder``, or None: generated data, or a
    deployment's devices), ``truth_file`` (``data.truth``, or None) and ``deployed``.

    Everything else the platform reads is here with a default, or in one of the opt-in
    capabilities below (``Stateful``, ``KnownClusters``, ``CoarseStatistics``,
    ``TrainsOnUploads``, ``SimulatedAttacks``, ``DeviceFiles``); ``workloads.register``
    checks that a workload implements every member of the capabilities it declares.
    """

    name: ClassVar[str]
    section: ClassVar[str]
    schema: ClassVar[dict[str, ConfigField]]
    key_metric: ClassVar[str]
    loss_name: ClassVar[str] = "loss"  # how the run record names the mean local loss
    higher_is_better: ClassVar[bool] = False  # direction of ``key_metric``
    single_model: ClassVar[bool] = False  # True: trains one global model (no k-model strategies)
    # -- what the report draws (simulations.report): all optional --
    curve_x: ClassVar[str | None] = None  # axis label to plot the key metric against examples used
    summary_metrics: ClassVar[tuple[str, ...]] = ()  # more final-round metrics for the summary table
    plot_metrics: ClassVar[tuple[str, ...]] = ()  # more per-round metrics plotted (<metric>.png)
    # a metric's plot draws another (constant) metric as a dashed reference line: metric -> (reference, label)
    reference_lines: ClassVar[dict[str, tuple[str, str]]] = {}
    # per-round counts (totals in the record) that deserve a warning when non-zero: name -> what it means
    warn_counts: ClassVar[dict[str, str]] = {}
    # the scenario fields a memory refusal names: what its estimate grows with
    memory_fields: ClassVar[tuple[str, ...]] = ("federation.clients", "federation.cohort_size")

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        fed = scenario["federation"]
        self.federation = dict(fed)
        self.seed, self.num_clients = int(fed["seed"]), int(fed["clients"])
        self.anchor_ids = anchor_ids(scenario.get("anchors", {}), self.num_clients, self.seed)
        self.anchor_count = len(self.anchor_ids)
        data = scenario.get("data", {})
        self.deployed = bool(data.get("deployed", False))  # the data are devices' files (umbel deploy run)
        self.data_folder = Path(data["folder"]).expanduser() if data.get("folder") and not self.deployed else None
        self.truth_file = truth_path(data)

    # ---- scenario-level hooks (class methods: no instance needed) ------------------------

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """Cross-field checks over the whole scenario: a list of (dotted field, message)."""
        return []

    @classmethod
    def key_metric_for(cls, scenario: dict[str, dict[str, Any]]) -> str:
        """The key metric of a run of this scenario (``key_metric``, unless the scenario
        leaves the workload without it, e.g. a data folder without its truth)."""
        return cls.key_metric

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """What the clustered strategies' Phase 1 needs of this scenario (e.g. anchors per
        cluster); the platform calls it only when a strategy with Phase 1 runs, after
        checking that the workload answers the steps of ``clustered.phase1``."""
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """Reference runs outside the federation, as scenario overrides by name (e.g. one
        client holding all data); the launcher runs them in-process after the simulation."""
        return {}

    @classmethod
    def memory_estimate(cls, scenario: dict[str, dict[str, Any]], actors: int) -> float | None:
        """Expected peak bytes of a simulation with ``actors`` Ray workers, all processes
        (None: no estimate). The launcher refuses to start (without ``--force``) when it
        exceeds the available memory, naming ``memory_fields``."""
        return None

    def variants(self) -> tuple[str, ...]:
        """Arms compared within every strategy (e.g. active-learning selection rules), each
        run on the same federation and seed; ``("",)``: the workload has none."""
        return ("",)

    # ---- the core: data, model, local loss and training ----------------------------------

    @abstractmethod
    def client_data(self, client_ids: np.ndarray) -> CohortData:
        """Local data of the given virtual clients (deterministic in seed and client id)."""

    @abstractmethod
    def initial_parameters(self) -> Params:
        """Parameters of one model before any training (deterministic in the seed)."""

    @abstractmethod
    def local_loss(self, params: Params, data: CohortData) -> np.ndarray:
        """Mean local loss of every client of the cohort under ``params``: shape (B,)."""

    @abstractmethod
    def local_train(self, start: Params, data: CohortData, settings: TrainSettings) -> Params:
        """Train each client from its own start (arrays stacked on a leading (B,) axis).

        Returns the trained parameters, stacked the same way.
        """

    @abstractmethod
    def subset(self, data: CohortData, index: np.ndarray) -> CohortData:
        """The cohort data of the clients at positions ``index`` (e.g. this round's active ones)."""

    def random_models(self, k: int, seed: int) -> Params:
        """k random models stacked on a model axis (IFCA's start, ``clustered.init =
        "random"``). Default: N(0, I/size) per array, the scale of a unit-norm linear model;
        neural workloads override it with draws of their own initialisation."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, streams.LINEAR_INIT]))
        return {n: rng.standard_normal((k, *v.shape)) / np.sqrt(v.size)
                for n, v in self.initial_parameters().items()}

    def local_losses(self, models: Params, data: CohortData) -> np.ndarray:
        """(B, k): every client's mean loss under each of k models (stacked on axis 0).
        Override when one pass over the data can score all models at once."""
        k = len(next(iter(models.values())))
        return np.stack(
            [self.local_loss({n: v[j] for n, v in models.items()}, data) for j in range(k)], axis=1
        )

    def local_evaluate(self, params: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Per-client metric *sums* over each client's examples (mean = sum / n)."""
        return {"loss": self.local_loss(params, data) * data.num_examples}

    # ---- Phase 1 of the clustered strategy: anchors train from a common start --------------

    def is_anchor(self, client_ids: np.ndarray) -> np.ndarray:
        """Whether each client is an anchor (``anchors.ids``, or ``anchors.count`` of the
        first ids or of a seeded random draw)."""
        return np.isin(np.asarray(client_ids), self.anchor_ids)

    def anchor_models(self, request: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Phase 1 for any trainable model (the ``anchor-train`` step): each anchor trains
        ``request["steps"]`` local steps (step size ``request["lr"]``) from the common start
        ``request["start"]`` (flattened) and sends its model, flattened, as a row."""
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
        settings = TrainSettings(local_steps=int(np.sum(request["steps"])), lr=float(np.sum(request["lr"])))
        trained = self.local_train(stack_params(start, len(index)), anchors, settings)
        rows = np.concatenate([np.asarray(trained[n], np.float64).reshape(len(index), -1) for n in reference], axis=1)
        return {"client-id": anchors.client_ids, "estimate": rows}

    # ---- server side: metrics of the current models ----------------------------------------

    @property
    def num_clusters(self) -> int:
        """k for the k-model strategies (1: the workload has no cluster structure)."""
        return 1

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        """Server-side metrics of the current model(s), stacked on a leading model axis.

        ``confusion`` (chosen cluster x true cluster x size bucket, client counts) comes from
        clients that know their true cluster (``KnownClusters``) and yields misclustering
        rates. Empty when there is no ground truth.
        """
        return {}

    def final_report(self, models: Params) -> dict[str, Any]:
        """JSON-ready extras on the final models for the run record's figures (e.g. a rollout
        error curve, a predicted field); empty by default."""
        return {}


# ---- opt-in capabilities: a workload declares one by inheriting it -------------------------


class Stateful(ABC):
    """Clients remember something between rounds (e.g. which samples are labeled): the
    client app keeps the state per node and arm (Flower's ``context.state``)."""

    @abstractmethod
    def initial_state(self, data: CohortData) -> Params:
        """The cohort's state before round 1, as arrays."""

    @abstractmethod
    def with_state(self, data: CohortData, state: Params) -> CohortData:
        """The data the cohort trains and is evaluated on under ``state``."""

    @abstractmethod
    def update_state(
        self, model: Params, data: CohortData, state: Params, round_: int, variant: str,
        active: np.ndarray,
    ) -> tuple[Params, dict[str, np.ndarray]]:
        """At the start of a round, with the one model received: the new state and per-client
        metric sums (shape (B,)); ``active`` marks the clients taking part this round."""


class KnownClusters(ABC):
    """Synthetic federations whose clients know their true cluster and whose true models are
    known: the oracle strategy, misclustering rates and ARI. Data read from a device carry
    no labels (``true_clusters`` returns None): the record then has no misclustering."""

    @abstractmethod
    def true_clusters(self, data: CohortData) -> np.ndarray | None:
        """(B,) true cluster of each client of the cohort, or None when unknown."""

    def true_parameters(self) -> Params | None:
        """The true models stacked on a model axis, when known (``clustered.init = truth``)."""
        return None


class CoarseStatistics(ABC):
    """Phase-1 steps of the clustered strategy beyond ``anchor-train`` (e.g. the moments of
    linear models); the step and statistic names are in ``proto.wire``."""

    coarse_steps: ClassVar[tuple[str, ...]]

    @abstractmethod
    def coarse_statistics(self, step: str, request: Params, data: CohortData) -> dict[str, np.ndarray]:
        """Per-client arrays with a leading client axis, including ``client-id``; the step
        decides whether they are summed over clients or sent as rows (anchors). Raw data
        never leave the client."""

    def coarse_chunk(self) -> int:
        """Clients per pass of a statistic (fewer when per-client statistics are large)."""
        return 2048


class TrainsOnUploads(ABC):
    """Server-side training on what clients upload (``data-union``): clients send small
    datasets; the server checks them against ``upload_spec`` and trains on the union."""

    upload_classes: ClassVar[int]

    @classmethod
    def uploads_data(cls, scenario: dict[str, dict[str, Any]]) -> bool:
        """Whether this scenario's clients upload data (only ``data-union`` trains on it)
        rather than models (the weight aggregators); validation checks the strategies."""
        return True

    @abstractmethod
    def upload_spec(self) -> dict[str, tuple[int, ...]]:
        """The shapes of one client's upload: ``{"images": ..., "labels": ...}``."""

    @abstractmethod
    def server_train(self, images: np.ndarray, labels: np.ndarray, owners: np.ndarray,
                     round_: int) -> tuple[Params, dict[str, Any]]:
        """The global model trained on the union, and per defense the clients it flags."""


class SimulatedAttacks(ABC):
    """Simulated attackers (simulation only): the server scores each defense's flags
    against them; strategies never see who attacks."""

    @abstractmethod
    def malicious_clients(self, variant: str) -> np.ndarray:
        """Ids of the clients that attack in this arm."""

    @abstractmethod
    def evaluation_probe(self, data: CohortData, state: Params | None, variant: str) -> Params | None:
        """What a simulated attacker reveals to the evaluator with its reply (e.g. its
        trigger, to measure attack success); never aggregated. None: nothing."""

    @abstractmethod
    def observe_probes(self, probes: list[Params]) -> None:
        """The server-side workload receives the round's probes before its central metrics."""


class NormalEquations(ABC):
    """Second-order refinement: a client's mean loss is a quadratic of the flattened model,
    ``w'A w - 2 b'w + c``, and the client sends (A, b) (for least squares: X'X/n and X'y/n),
    and c too for soft assignments. The server adds them per cluster and solves each
    cluster's least squares."""

    @abstractmethod
    def normal_equations(self, data: CohortData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """((B, P, P), (B, P), (B,)): each client's per-example normal matrix, vector and
        constant (its mean loss at the zero model)."""


class DeviceFiles(ABC):
    """Deployment: one client's data in one file (``umbel data export`` writes them, a
    SuperNode's ``data-path`` names them; see ``workloads.device_files``). Device files
    carry no cluster labels."""

    device_format: ClassVar[str]  # the file format, documented

    @abstractmethod
    def device_files(self, data: CohortData) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Each client of a cohort as (client id, the arrays of its device file)."""

    @abstractmethod
    def read_device_files(self, files: list[Any]) -> CohortData:
        """A device's cohort from its client files; raises ``DeviceDataError`` naming the
        file and the problem (missing, truncated, wrong shape, not this scenario's)."""


CAPABILITIES: tuple[type, ...] = (
    Stateful, KnownClusters, CoarseStatistics, TrainsOnUploads, SimulatedAttacks, DeviceFiles, NormalEquations,
)
CAPABILITY_ATTRIBUTES = {  # declared values a capability needs besides its methods
    CoarseStatistics: ("coarse_steps",), TrainsOnUploads: ("upload_classes",), DeviceFiles: ("device_format",),
}


def anchor_ids(anchors: dict[str, Any], clients: int, seed: int) -> np.ndarray:
    """The anchor clients' ids, sorted: ``anchors.ids`` when given, else ``anchors.count`` ids,
    the first ones (``choice = "first"``) or drawn without replacement from the seed."""
    if anchors.get("ids"):
        return np.sort(np.asarray(anchors["ids"], dtype=np.int64))
    count = int(anchors.get("count", 0))
    if anchors.get("choice", "first") == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, streams.ANCHORS]))
        return np.sort(rng.choice(clients, size=min(count, clients), replace=False).astype(np.int64))
    return np.arange(count, dtype=np.int64)


class WorkloadContractError(TypeError):
    """A workload class that does not implement what it declares; the message names it."""


def check_contract(cls: type) -> None:
    """Raise ``WorkloadContractError`` naming every member a workload class lacks: the
    core's abstract methods and class attributes, and each declared capability's."""
    if not (isinstance(cls, type) and issubclass(cls, Workload)):
        raise WorkloadContractError(f"{cls!r} is not a subclass of workloads.base.Workload")
    missing: list[str] = []
    owners = [Workload, *(c for c in CAPABILITIES if issubclass(cls, c))]
    for owner in owners:
        label = "core" if owner is Workload else owner.__name__
        methods = sorted(m for m in getattr(cls, "__abstractmethods__", ()) if m in vars(owner))
        attributes = ("name", "section", "schema", "key_metric") if owner is Workload else CAPABILITY_ATTRIBUTES.get(owner, ())
        missing += [f"{label}: {m}()" for m in methods]
        missing += [f"{label}: {a}" for a in attributes if not hasattr(cls, a)]
    if missing:
        raise WorkloadContractError(f"workload {cls.__module__}.{cls.__qualname__} does not implement "
                                    + ", ".join(missing))


# Client-size buckets for misclustering: 1, 2, 3-10 and over 10 points.
SIZE_BUCKETS = ("n1", "n2", "n3_10", "n11plus")


def pooled_baseline(section: str, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Scenario overrides of the centralised reference run for a workload whose
    ``<section>.pool_clients`` lets one client hold every client's data: FedAvg of that one
    client, with as many local steps a round as the whole federation takes."""
    fed, train = scenario["federation"], scenario["train"]
    return {"run": {"strategies": ["fedavg"]},
            "federation": {"clients": 1, "cohort_size": 1, "participation": 1.0, "dropout": 0.0},
            "anchors": {"count": 0}, section: {"pool_clients": fed["clients"]},
            "train": {"local_steps": train["local_steps"] * fed["clients"], "proximal_mu": 0.0}}


def pooled_baselines(section: str, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``pooled_baseline`` overrides for every name in ``<section>.baselines``; none when the
    run is itself the pooled one (``<section>.pool_clients > 0``)."""
    c = scenario[section]
    return {} if c["pool_clients"] else {name: pooled_baseline(section, scenario) for name in c["baselines"]}


def size_bucket(num_examples: np.ndarray) -> np.ndarray:
    return np.digitize(num_examples, [2, 3, 11])


def stack_params(params: Params, batch: int) -> Params:
    """Broadcast one model to a batch of clients (a copy per client, ready to train)."""
    return {k: np.repeat(v[None], batch, axis=0) for k, v in params.items()}
