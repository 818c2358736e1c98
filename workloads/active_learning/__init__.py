"""Federated active learning by gradient norm (Wang et al., AAAI 2022) on digits.

Each client holds a Dirichlet label-skewed pool of scikit-learn's digits, of which a small
seed set is labeled. Every ``rounds_per_cycle`` rounds (a query cycle), each client scores
its unlabeled pool with the global model it just received and reveals the labels of its
top-scored samples, within its share of the federation's per-cycle budget; then it trains
on everything labeled so far. Which samples are labeled is the cohort's *state*: the client
app keeps it across rounds (in Flower's ``context.state``), one per selection rule.

The selection rules (``scoring.RULES``) are the scenario's *variants*: every strategy runs
once per rule on the same federation and seed, so rules are compared paired. With
``centralised = true`` the launcher also runs every rule on one client holding the whole
pool (in-process), the usual upper reference for federated active learning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workloads.active_learning import device
from workloads.active_learning.data import SplitError, digits, split_federation
from workloads.active_learning.model import DigitsCNN, initial_parameters, loss
from workloads.active_learning.scoring import RULES, score_pool, top_k
from workloads import streams, torch_train
from workloads.base import ConfigField, Params, Stateful, TrainSettings, Workload, non_negative, positive
from workloads.base import DeviceFiles, some_of

STREAM_QUERY = streams.AL_QUERY
STREAM_TRAIN = streams.AL_TRAIN


_rule_list = some_of(RULES, "selection rule")


@dataclass(frozen=True)
class DigitsCohort:
    """The pools of a cohort's clients, concatenated (labels revealed only when queried)."""

    client_ids: np.ndarray  # (B,) int64
    images: np.ndarray  # (N, 1, 8, 8) float32
    targets: np.ndarray  # (N,) int64
    starts: np.ndarray  # (B + 1,) offsets of each client's pool
    seed_set: np.ndarray  # (N,) bool: labeled before round 1
    budget: np.ndarray  # (B,) labels each client reveals per query cycle

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)


@dataclass(frozen=True)
class LabeledDigits:
    """The labeled part of a cohort's pools: what clients train and are scored on."""

    client_ids: np.ndarray
    images: np.ndarray
    targets: np.ndarray
    starts: np.ndarray

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class ActiveLearning(Workload, Stateful, DeviceFiles):
    name = "active_learning"
    section = "active_learning"
    key_metric = "accuracy"
    higher_is_better = True
    curve_x = "labels used"
    single_model = True  # labeled sets are kept per arm, for one global model
    warn_counts = {"clipped": "requested items clipped (clients' pools exhausted)"}
    schema = {
        "rules": ConfigField(list, list(RULES), "selection rules compared, each run by every strategy", _rule_list),
        "alpha": ConfigField(float, 0.5, "Dirichlet concentration of the label skew (smaller: more skew)", positive),
        "test_size": ConfigField(int, 500, "images held out for the server's test accuracy", positive),
        "initial_labels": ConfigField(int, 40, "labels before round 1, over the federation (>= 1 per client)", positive),
        "budget": ConfigField(int, 40, "labels revealed per query cycle, over the federation", positive),
        "rounds_per_cycle": ConfigField(int, 5, "training rounds between two label queries", positive),
        "batch_size": ConfigField(int, 32, "local minibatch size", positive),
        "weight_decay": ConfigField(float, 5e-4, "Adam weight decay of local training", non_negative),
        "centralised": ConfigField(bool, True, "also run every rule on one client holding all data"),
    }

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        al, fed, run = scenario[cls.section], scenario["federation"], scenario["run"]
        problems = torch_train.check_device(scenario)
        total = len(digits()[1])
        pool = total - al["test_size"]
        if pool < 1:
            problems.append(("active_learning.test_size", f"{al['test_size']} leaves no pool of the {total} digits"))
            return problems
        if al["initial_labels"] < fed["clients"]:
            problems.append(("active_learning.initial_labels",
                             f"{al['initial_labels']} is below federation.clients ({fed['clients']}): "
                             "every client starts with at least one label"))
        needed = al["initial_labels"] + al["budget"] * cls.queries(run["rounds"], al["rounds_per_cycle"])
        if needed > pool:
            problems.append(("active_learning.budget",
                             f"initial_labels + budget x queries = {needed} labels exceeds the pool "
                             f"of {pool} images; lower the budget or run.rounds"))
        if not problems:
            try:
                split_federation(fed["seed"], fed["clients"], al["alpha"], al["test_size"],
                                 al["initial_labels"], al["budget"])
            except SplitError as err:
                field, _, message = str(err).partition(": ")
                problems.append((field, message))
        return problems

    @staticmethod
    def queries(rounds: int, rounds_per_cycle: int) -> int:
        """Label queries in a run: at rounds 1 + c * rounds_per_cycle, c >= 1."""
        return (rounds - 1) // rounds_per_cycle

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        if not scenario[cls.section]["centralised"] or scenario["federation"]["clients"] == 1:
            return {}
        return {"centralised": {"federation": {"clients": 1, "cohort_size": 1, "participation": 1.0,
                                               "dropout": 0.0}}}

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        # On the CPU, one torch thread: tens of times faster for a model this small on a busy
        # machine, and float sums then do not depend on the core count (the centralised
        # baselines run in the launcher's process, the federated arms in Ray workers: same numbers).
        self.torch_device = torch_train.select_device(scenario)
        super().__init__(scenario)
        al = scenario[self.section]
        self.rules = tuple(al["rules"])
        self.options = dict(al)
        self.split = split_federation(self.seed, self.num_clients, float(al["alpha"]),
                                      int(al["test_size"]), int(al["initial_labels"]), int(al["budget"]))
        self._model = DigitsCNN()
        self._trainer = torch_train.on_device(self._model, self.torch_device)
        images, targets = digits()
        self._test = (torch.from_numpy(images[self.split.test]), torch.from_numpy(targets[self.split.test]))

    # ---- data and state ------------------------------------------------------------------

    def client_data(self, client_ids: np.ndarray) -> DigitsCohort:
        images, targets = digits()
        ids = np.asarray(client_ids, dtype=np.int64)
        pools = [self.split.pools[i] for i in ids]
        seed_set = np.concatenate([np.isin(np.arange(len(p)), self.split.seed_sets[i])
                                   for i, p in zip(ids, pools)])
        index = np.concatenate(pools)
        return DigitsCohort(client_ids=ids, images=images[index], targets=targets[index],
                            starts=_offsets([len(p) for p in pools]), seed_set=seed_set,
                            budget=self.split.budget[ids])

    device_format = device.FORMAT

    def device_files(self, data: DigitsCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> DigitsCohort:
        return DigitsCohort(*device.read_device_files(files, self.num_clients))

    def variants(self) -> tuple[str, ...]:
        return self.rules

    def initial_state(self, data: DigitsCohort) -> Params:
        return {"labeled": data.seed_set.astype(np.uint8)}

    def with_state(self, data: DigitsCohort, state: Params) -> LabeledDigits:
        mask = np.asarray(state["labeled"], dtype=bool)
        counts = np.add.reduceat(mask.astype(np.int64), data.starts[:-1])
        return LabeledDigits(data.client_ids, data.images[mask], data.targets[mask], _offsets(counts))

    def is_query_round(self, round_: int) -> bool:
        rpc = int(self.options["rounds_per_cycle"])
        return round_ > 1 and (round_ - 1) % rpc == 0

    def update_state(
        self, model: Params, data: DigitsCohort, state: Params, round_: int, variant: str,
        active: np.ndarray,
    ) -> tuple[Params, dict[str, np.ndarray]]:
        """On a query round, every active client labels its top-scored unlabeled samples.

        A client whose unlabeled pool is smaller than its share reveals what is left; the
        shortfall is reported as ``clipped`` (and logged by the server), never an error.
        """
        b = len(data.client_ids)
        queried, clipped = np.zeros(b), np.zeros(b)
        if not self.is_query_round(round_):
            return state, {"queried": queried, "clipped": clipped}
        if variant not in RULES:
            raise ValueError(f"unknown selection rule {variant!r}; expected one of {list(RULES)}")
        mask = np.asarray(state["labeled"], dtype=bool).copy()
        owner = np.repeat(np.arange(b), data.num_examples)
        candidates = np.flatnonzero(~mask & active[owner])
        if variant == "random":  # a stream per (client, round): independent of the cohort
            counts = np.bincount(owner[candidates], minlength=b)
            scores = np.concatenate([
                np.random.default_rng(np.random.SeedSequence(
                    [self.seed, STREAM_QUERY, int(c), round_])).random(n)
                for c, n in zip(data.client_ids, counts)])
        else:  # one batched pass over the cohort: every client scores with the same model
            torch_train.set_params(self._model, model)
            scores = score_pool(variant, self._model, torch.from_numpy(data.images[candidates]))
        for j in np.flatnonzero(active):
            mine = owner[candidates] == j
            want = int(data.budget[j])
            take = min(want, int(mine.sum()))
            mask[candidates[mine][top_k(scores[mine], take)]] = True
            queried[j], clipped[j] = take, want - take
        return {"labeled": mask.astype(np.uint8)}, {"queried": queried, "clipped": clipped}

    # ---- model ---------------------------------------------------------------------------

    def initial_parameters(self) -> Params:
        return initial_parameters(self.seed)

    def _logits(self, params: Params, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        torch_train.set_params(self._model, params)
        self._model.eval()
        with torch.no_grad():
            return self._model(torch.as_tensor(images))

    def local_loss(self, params: Params, data: LabeledDigits) -> np.ndarray:
        ce = F.cross_entropy(self._logits(params, data.images), torch.from_numpy(data.targets),
                             reduction="none").double().numpy()
        return np.add.reduceat(ce, data.starts[:-1]) / data.num_examples

    def local_evaluate(self, params: Params, data: LabeledDigits) -> dict[str, np.ndarray]:
        logits = self._logits(params, data.images)
        targets = torch.from_numpy(data.targets)
        ce = F.cross_entropy(logits, targets, reduction="none").double().numpy()
        correct = (logits.argmax(1) == targets).double().numpy()
        return {"loss": np.add.reduceat(ce, data.starts[:-1]),
                "accuracy": np.add.reduceat(correct, data.starts[:-1])}

    def local_train(self, start: Params, data: LabeledDigits, settings: TrainSettings) -> Params:
        """``local_steps`` Adam steps per client on minibatches drawn epoch by epoch from a
        shuffle seeded by (seed, client, round)."""
        images, targets = torch.from_numpy(data.images), torch.from_numpy(data.targets)
        optimizer = partial(torch.optim.Adam, lr=settings.lr, weight_decay=float(self.options["weight_decay"]))

        def train(j: int, model: torch.nn.Module) -> None:
            lo, hi = data.starts[j], data.starts[j + 1]
            rng = np.random.default_rng(np.random.SeedSequence(
                [self.seed, STREAM_TRAIN, int(data.client_ids[j]), settings.server_round]))
            order = torch_train.numpy_epochs(int(hi - lo), int(self.options["batch_size"]), rng)
            batches = torch_train.minibatches((images[lo:hi], targets[lo:hi]), order, self.torch_device)
            torch_train.train_steps(model, loss, batches, steps=settings.local_steps, optimizer=optimizer,
                                    proximal_mu=settings.proximal_mu)

        return torch_train.train_clients(self._trainer, start, train)

    def subset(self, data: LabeledDigits, index: np.ndarray) -> LabeledDigits:
        pieces = [np.arange(data.starts[j], data.starts[j + 1]) for j in index]
        rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        return LabeledDigits(data.client_ids[index], data.images[rows], data.targets[rows],
                             _offsets(data.num_examples[index]))

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        """Test accuracy and loss of the global model on the held-out digits."""
        images, targets = self._test
        logits = self._logits({n: v[0] for n, v in models.items()}, images)
        return {
            "accuracy": float((logits.argmax(1) == targets).double().mean()),
            "test_loss": float(F.cross_entropy(logits, targets)),
        }
