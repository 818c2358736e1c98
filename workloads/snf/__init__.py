"""SNF-style filter pruning in a federation: train dense, search the widths, prune, fine-tune.

SNF (Liu et al., arXiv 2112.07282) searches how many filters each layer keeps under a
FLOPs budget, then prunes each layer to that count by an importance criterion and
fine-tunes. Its search is reconstructed here (no official code or paper body could be
read): an "SNF-style width search". One arm runs on the round engine in three phases,
all chosen by the round number, with everything the phases hand on carried in the model:

1. rounds 1..``dense_rounds``: FedAvg (or FedProx) of the dense ResNet (``model.ResNet``)
   on the clients' hard digits (``data``; a Dirichlet(alpha) class mix per client);
2. round ``dense_rounds + 1``, the search round: every client derives the same candidate
   widths from the scenario (the uniform widths first, then seeded random ones, all within
   the FLOPs budget, every layer keeping at least ``min_keep`` of its filters), prunes the
   received dense model to each candidate by the criterion, scores it on its own data (BN
   statistics reset on its training images, ``proxy_steps`` local fine-tune steps, accuracy
   on its validation images) and sends the scores in the model's ``snf.scores`` array; the
   dense weights go back unchanged. The server's FedAvg turns them into the federation's
   example-weighted mean score per candidate;
3. from round ``dense_rounds + 2``: every client picks the best-scored candidate (ties: the
   lower index, so the uniform widths win a tie), prunes the received model to it and
   fine-tunes with lr ``finetune_lr``. The masks travel in the model (``blocks.<i>.mask``):
   every client holds the same ones, so FedAvg keeps them.

The arms (the workload's variants, each on the same federation and seed, so paired): the
``dense`` model (trained on the same schedule, no pruning), and for every FLOPs cut in
``cuts`` the ``uniform`` widths, ``random`` widths (one seeded draw from the search space),
``random-wide`` widths (opt-in: one draw from the spec's wider space of random structures,
every layer keeping at least a tenth) and the ``searched`` widths. The client learns its arm at the start of every round
(``Stateful``: the state is the arm's name). Central metrics: test accuracy of the global
model on held-out distorted digits, its FLOPs (``mflops``, ``flops_cut``) and its widths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from workloads import streams, torch_train
from workloads.base import (
    ConfigField, DeviceFiles, Params, Stateful, TrainSettings, Workload, non_negative, positive, some_of,
)
from workloads.device_files import offsets, rows_of
from workloads.digits import digits
from workloads.snf import device
from workloads.snf.data import SplitError, augment, fixed_views, generator, split_federation, upsample
from workloads.snf.model import Arch, ResNet, flops, mask_names
from workloads.snf.pruning import CRITERIA, BudgetError, candidates, filter_scores, keep_filters
from workloads.snf.pruning import random_widths, uniform_widths

METHODS = ("dense", "uniform", "random", "random-wide", "searched")
DEFAULT_METHODS = ("dense", "uniform", "random", "searched")
WIDE_MIN_KEEP = 0.1  # the spec's random structures: per-layer keep ratios from 0.1 (its baseline b)
PROXIES = ("finetune", "bn-reset")
SCORES = ("accuracy", "loss")
SCORES_KEY = "snf.scores"
BN_RESET_IMAGES = 256  # training images per client whose statistics replace BN's


_methods = some_of(METHODS, "method")


def _cuts(v: list) -> str | None:
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1 for c in v):
        return "every cut must be a number in (0, 1) (the fraction of FLOPs removed)"
    return "has repeated cuts" if len(set(v)) != len(v) else None


def _widths(v: list) -> str | None:
    if not v or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in v):
        return "must be a non-empty list of positive integers (channels per stage)"
    return None


def _fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "must lie in (0, 1)"


def _keep(v: float) -> str | None:
    return None if 0 < v <= 1 else "must lie in (0, 1]"


def variant_name(method: str, cut: float | None) -> str:
    return method if cut is None else f"{method}@{cut:g}"


def parse_variant(variant: str) -> tuple[str, float | None]:
    """``"searched@0.5"`` -> ("searched", 0.5); ``"dense"`` -> ("dense", None)."""
    method, _, cut = variant.partition("@")
    if method not in METHODS or (method == "dense") != (cut == ""):
        raise ValueError(f"unknown SNF arm {variant!r}; expected 'dense' or '<method>@<cut>' "
                         f"with a method of {list(METHODS[1:])}")
    return method, (float(cut) if cut else None)


@dataclass(frozen=True, kw_only=True)
class DigitsCohort:
    """A cohort's originals (8x8, distorted on use): training images from ``starts[j]``,
    validation images from ``val_starts[j]``; ``variant`` is the arm (from the state)."""

    client_ids: np.ndarray  # (B,) int64
    images: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    targets: np.ndarray  # (N,) int64
    starts: np.ndarray  # (B + 1,)
    val_images: np.ndarray  # (M, 1, 8, 8) float32
    val_targets: np.ndarray  # (M,) int64
    val_starts: np.ndarray  # (B + 1,)
    variant: str = "dense"

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)


class SNFPruning(Workload, Stateful, DeviceFiles):
    name = "snf_pruning"
    section = "snf"
    key_metric = "accuracy"
    higher_is_better = True
    single_model = True
    summary_metrics = ("mflops", "flops_cut", *(f"width_{i}" for i in range(1, 13)))
    plot_metrics = ("mflops",)
    schema = {
        "methods": ConfigField(list, list(DEFAULT_METHODS), "arms: dense, and per cut uniform / random / "
                               "random-wide / searched widths",
                               _methods),
        "cuts": ConfigField(list, [0.5, 0.65], "FLOPs cuts (fraction removed) of the pruned arms", _cuts),
        "dense_rounds": ConfigField(int, 10, "rounds of dense training before the search round", non_negative),
        "widths": ConfigField(list, [16, 32, 64], "channels of the ResNet's three stages", _widths),
        "blocks": ConfigField(int, 2, "basic blocks per stage", positive),
        "alpha": ConfigField(float, 0.5, "Dirichlet concentration of the clients' class mixes", positive),
        "test_size": ConfigField(int, 300, "digits held out for the server's test set", positive),
        "test_views": ConfigField(int, 4, "distorted views of each test digit", positive),
        "val_fraction": ConfigField(float, 0.2, "share of each client's digits kept for scoring candidates",
                                    _fraction),
        "batch_size": ConfigField(int, 32, "local minibatch size", positive),
        "weight_decay": ConfigField(float, 5e-4, "AdamW weight decay of local training", non_negative),
        "finetune_lr": ConfigField(float, 1e-3, "local step size of every round after the search round",
                                   positive),
        "candidates": ConfigField(int, 16, "widths scored in the search (the uniform ones included)", positive),
        "proxy": ConfigField(str, "finetune", "how clients score a candidate: BN reset then local fine-tune "
                             "steps, or BN reset alone", choices=PROXIES),
        "proxy_steps": ConfigField(int, 10, "local fine-tune steps per candidate (proxy = finetune)", positive),
        "proxy_lr": ConfigField(float, 1e-3, "step size of those steps", positive),
        "score": ConfigField(str, "accuracy", "the candidates' score: validation accuracy or minus its loss",
                             choices=SCORES),
        "criterion": ConfigField(str, "l1", "which filters a layer keeps", choices=tuple(CRITERIA)),
        "min_keep": ConfigField(float, 0.2, "every layer keeps at least this share of its filters", _keep),
        "tolerance": ConfigField(float, 0.02, "candidates' FLOPs lie within this share of the dense FLOPs "
                                 "below the budget", _fraction),
    }

    # ---- scenario -------------------------------------------------------------------------

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        snf, fed, run = scenario[cls.section], scenario["federation"], scenario["run"]
        problems = torch_train.check_device(scenario)
        others = [s for s in run["strategies"] if s not in ("fedavg", "fedprox")]
        if others:
            problems.append(("run.strategies", f"{others[0]!r}: the search averages the clients' candidate "
                             "scores with the model, which only fedavg and fedprox do"))
        pruned = [m for m in snf["methods"] if m != "dense"]
        if pruned and not snf["cuts"]:
            problems.append(("snf.cuts", f"methods {pruned} need at least one FLOPs cut"))
        if pruned and run["rounds"] < snf["dense_rounds"] + 2:
            problems.append(("run.rounds", f"{run['rounds']} leaves no fine-tuning: the pruned arms need "
                             f"snf.dense_rounds + 2 = {snf['dense_rounds'] + 2} rounds or more "
                             "(dense training, the search round, then fine-tuning)"))
        total = len(digits()[1])
        if snf["test_size"] >= total:
            problems.append(("snf.test_size", f"{snf['test_size']} leaves none of the {total} digits to clients"))
        elif not problems:
            try:
                split_federation(fed["seed"], fed["clients"], snf["alpha"], snf["test_size"], snf["val_fraction"])
            except SplitError as err:
                field, _, message = str(err).partition(": ")
                problems.append((field, message))
        arch = Arch(tuple(snf["widths"]), snf["blocks"])
        for cut in snf["cuts"] if pruned else []:
            try:
                uniform_widths(arch, cut, snf["tolerance"], snf["min_keep"])
            except BudgetError as err:
                problems.append(("snf.cuts", str(err)))
        return problems

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        # one torch thread on the CPU (many small clients on few cores)
        self.torch_device = torch_train.select_device(scenario)
        super().__init__(scenario)
        snf = scenario[self.section]
        self.options = dict(snf)
        self.arch = Arch(tuple(int(w) for w in snf["widths"]), int(snf["blocks"]))
        self.dense_flops = flops(self.arch)
        self.split = split_federation(self.seed, self.num_clients, float(snf["alpha"]),
                                      int(snf["test_size"]), float(snf["val_fraction"]))
        self.arms = tuple(variant_name(m, None) if m == "dense" else variant_name(m, float(c))
                          for m in snf["methods"] for c in ([None] if m == "dense" else snf["cuts"]))
        self._model = ResNet(self.arch)
        self._trainer = torch_train.on_device(self._model, self.torch_device)
        images, targets = digits()
        test = self.split.test
        self._test = (fixed_views(images[test], int(snf["test_views"]), self.seed, streams.SNF_VIEWS),
                      torch.from_numpy(np.tile(targets[test], int(snf["test_views"]))))

    def variants(self) -> tuple[str, ...]:
        return self.arms

    @property
    def search_round(self) -> int:
        return int(self.options["dense_rounds"]) + 1

    # ---- data and the arm ---------------------------------------------------------------------

    def client_data(self, client_ids: np.ndarray) -> DigitsCohort:
        images, targets = digits()
        ids = np.asarray(client_ids, np.int64)
        train = np.concatenate([self.split.train[i] for i in ids])
        val = np.concatenate([self.split.val[i] for i in ids])
        return DigitsCohort(client_ids=ids, images=images[train], targets=targets[train],
                            starts=offsets([len(self.split.train[i]) for i in ids]),
                            val_images=images[val], val_targets=targets[val],
                            val_starts=offsets([len(self.split.val[i]) for i in ids]))

    device_format = device.FORMAT

    def device_files(self, data: DigitsCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> DigitsCohort:
        return DigitsCohort(**device.read_device_files(files, self.num_clients))

    def initial_state(self, data: DigitsCohort) -> Params:
        return {"arm": np.frombuffer(b"dense", np.uint8).copy()}

    def update_state(self, model: Params, data: DigitsCohort, state: Params, round_: int, variant: str,
                     active: np.ndarray) -> tuple[Params, dict[str, np.ndarray]]:
        parse_variant(variant or "dense")
        return {"arm": np.frombuffer((variant or "dense").encode(), np.uint8).copy()}, {}

    def with_state(self, data: DigitsCohort, state: Params) -> DigitsCohort:
        return replace(data, variant=bytes(np.asarray(state["arm"], np.uint8)).decode())

    def subset(self, data: DigitsCohort, index: np.ndarray) -> DigitsCohort:
        rows, val_rows = rows_of(data.starts, index), rows_of(data.val_starts, index)
        return replace(data, client_ids=data.client_ids[index], images=data.images[rows],
                       targets=data.targets[rows], starts=offsets(data.num_examples[index]),
                       val_images=data.val_images[val_rows], val_targets=data.val_targets[val_rows],
                       val_starts=offsets(np.diff(data.val_starts)[index]))

    # ---- model --------------------------------------------------------------------------------

    def initial_parameters(self) -> Params:
        with torch.random.fork_rng():
            torch.manual_seed(int(np.random.SeedSequence([self.seed, streams.SNF_INIT]).generate_state(1)[0]))
            model = ResNet(self.arch)
        params = torch_train.get_params(model, by="state_dict")
        params[SCORES_KEY] = np.zeros(int(self.options["candidates"]), np.float32)
        return params

    def _load(self, params: Params, model: ResNet | None = None) -> ResNet:
        model = self._model if model is None else model
        torch_train.set_params(model, params, by="state_dict")
        model.eval()
        return model

    def _logits(self, params: Params, images: torch.Tensor) -> torch.Tensor:
        model = self._load(params)
        with torch.no_grad():
            return model(images)

    def local_loss(self, params: Params, data: DigitsCohort) -> np.ndarray:
        """Mean cross-entropy on each client's training digits, undistorted."""
        ce = F.cross_entropy(self._logits(params, upsample(data.images)), torch.from_numpy(data.targets),
                             reduction="none").double().numpy()
        return np.add.reduceat(ce, data.starts[:-1]) / data.num_examples

    def local_evaluate(self, params: Params, data: DigitsCohort) -> dict[str, np.ndarray]:
        logits = self._logits(params, upsample(data.images))
        targets = torch.from_numpy(data.targets)
        ce = F.cross_entropy(logits, targets, reduction="none").double().numpy()
        correct = (logits.argmax(1) == targets).double().numpy()
        return {"loss": np.add.reduceat(ce, data.starts[:-1]), "accuracy": np.add.reduceat(correct, data.starts[:-1])}

    # ---- widths and masks ---------------------------------------------------------------------

    def pool(self, cut: float) -> np.ndarray:
        """The search's candidate widths at ``cut`` (the uniform ones first): what every client
        and the server derive from the scenario alone."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.SNF_WIDTHS, round(cut * 1e6), 0]))
        o = self.options
        return candidates(self.arch, cut, float(o["tolerance"]), float(o["min_keep"]), int(o["candidates"]), rng)

    def random_arm_widths(self, cut: float, wide: bool = False) -> np.ndarray:
        """One seeded draw of random widths: from the search space, or (``wide``) from the spec's
        wider space where a layer may keep a tenth of its filters."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.SNF_WIDTHS, round(cut * 1e6),
                                                            2 if wide else 1]))
        min_keep = WIDE_MIN_KEEP if wide else float(self.options["min_keep"])
        return random_widths(self.arch, cut, float(self.options["tolerance"]), min_keep, rng)

    def widths_for(self, method: str, cut: float, scores: np.ndarray) -> np.ndarray:
        """The widths an arm prunes to (``searched``: the best mean score, ties to the lower index)."""
        if method == "uniform":
            return uniform_widths(self.arch, cut, float(self.options["tolerance"]), float(self.options["min_keep"]))
        if method in ("random", "random-wide"):
            return self.random_arm_widths(cut, wide=method == "random-wide")
        return self.pool(cut)[int(np.argmax(np.asarray(scores, np.float64)))]

    def masks(self, params: Params, widths: np.ndarray) -> Params:
        """Each block's mask keeping ``widths[i]`` filters of its first conv by the criterion,
        computed on the global model's weights (identical on every client)."""
        crit = str(self.options["criterion"])
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.SNF_CRITERION]))
        out = {}
        for i, (name, keep) in enumerate(zip(mask_names(self.arch), widths)):
            scores = filter_scores(crit, params[f"blocks.{i}.conv1.weight"], params[f"blocks.{i}.bn1.weight"], rng)
            out[name] = keep_filters(scores, int(keep))
        return out

    def prune(self, params: Params, widths: np.ndarray) -> Params:
        """``params`` with the masks of ``widths``; a pruned filter's conv and BN entries zeroed."""
        out = dict(params)
        for i, (name, mask) in enumerate(self.masks(params, widths).items()):
            out[name] = mask
            off = mask < 0.5
            for leaf in ("conv1.weight", "bn1.weight", "bn1.bias"):
                value = np.array(params[f"blocks.{i}.{leaf}"], np.float32)
                value[off] = 0.0
                out[f"blocks.{i}.{leaf}"] = value
        return out

    def widths_of(self, params: Params) -> np.ndarray:
        return np.array([int((np.asarray(params[n]) > 0.5).sum()) for n in mask_names(self.arch)], np.int64)

    def is_pruned(self, params: Params) -> bool:
        return bool(np.any(self.widths_of(params) < np.array(self.arch.block_widths)))

    # ---- local training -----------------------------------------------------------------------

    def _batches(self, data: DigitsCohort, j: int, rng: np.random.Generator, g: torch.Generator,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        images, targets = upsample(data.images[lo:hi]), torch.from_numpy(data.targets[lo:hi])
        for idx in torch_train.numpy_epochs(hi - lo, int(self.options["batch_size"]), rng):
            idx = torch.from_numpy(idx)
            yield augment(images[idx], g).to(self.torch_device), targets[idx].to(self.torch_device)

    def _train(self, model: ResNet, data: DigitsCohort, j: int, steps: int, lr: float, mu: float,
               key: tuple[int, ...]) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.SNF_TRAIN, *key]))
        g = generator(self.seed, streams.SNF_TRAIN, *key, 1)
        optimizer = partial(torch.optim.AdamW, lr=lr, weight_decay=float(self.options["weight_decay"]))
        torch_train.train_steps(model, loss, self._batches(data, j, rng, g), steps=steps, optimizer=optimizer,
                                proximal_mu=mu)

    def local_train(self, start: Params, data: DigitsCohort, settings: TrainSettings) -> Params:
        """The round's phase: dense training, the search round (scores, weights unchanged), or
        pruning (once) and fine-tuning with the shared masks."""
        method, cut = parse_variant(data.variant)
        round_ = settings.server_round
        scores = start[SCORES_KEY]
        weights = {n: v for n, v in start.items() if n != SCORES_KEY}
        if round_ == self.search_round:  # nothing trains; the searched arms score candidates
            out = {n: np.array(v, np.float32) for n, v in start.items()}
            if method == "searched":
                out[SCORES_KEY] = np.stack([self.score_candidates({n: v[j] for n, v in weights.items()}, data, j,
                                                                  cut, round_)
                                            for j in range(len(data.client_ids))]).astype(np.float32)
            return out
        lr = settings.lr
        if round_ > self.search_round:
            lr = float(self.options["finetune_lr"])
            if method != "dense":  # prune once, from the global model every client received
                first = {n: v[0] for n, v in start.items()}
                if not self.is_pruned(first):
                    pruned = self.prune(first, self.widths_for(method, cut, first[SCORES_KEY]))
                    weights = {n: np.repeat(pruned[n][None], len(data.client_ids), axis=0) for n in weights}

        def train(j: int, model: torch.nn.Module) -> None:
            self._train(model, data, j, settings.local_steps, lr, settings.proximal_mu,
                        (int(data.client_ids[j]), round_))

        out = torch_train.train_clients(self._trainer, weights, train, by="state_dict")
        out[SCORES_KEY] = np.array(scores, np.float32)
        return out

    # ---- the search's proxy -----------------------------------------------------------------

    def bn_reset(self, model: ResNet, data: DigitsCohort, j: int, key: tuple[int, ...]) -> None:
        """Replace BN's running statistics by those of up to ``BN_RESET_IMAGES`` of the client's
        training images (distorted), in one pass."""
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        take = np.random.default_rng(np.random.SeedSequence([self.seed, streams.SNF_TRAIN, *key, 2])).permutation(
            hi - lo)[:BN_RESET_IMAGES]
        x = augment(upsample(data.images[lo:hi][take]), generator(self.seed, streams.SNF_TRAIN, *key, 3))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0  # the pass is one batch: its statistics replace the old ones
        model.train()
        with torch.no_grad():
            model(x.to(self.torch_device))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
        model.eval()

    def score_candidates(self, dense: Params, data: DigitsCohort, j: int, cut: float, round_: int) -> np.ndarray:
        """Client j's score of every candidate at ``cut``: prune the dense model to it, reset
        BN on its training images, ``proxy_steps`` fine-tune steps (proxy = finetune), then
        validation accuracy (or minus the loss). Every candidate sees the same batches."""
        o = self.options
        cid = int(data.client_ids[j])
        lo, hi = int(data.val_starts[j]), int(data.val_starts[j + 1])
        val_x = fixed_views(data.val_images[lo:hi], 1, self.seed, streams.SNF_VIEWS, cid + 1)
        val_y = torch.from_numpy(data.val_targets[lo:hi])
        model = self._trainer
        out = []
        for widths in self.pool(cut):
            self._load(self.prune(dense, widths), model)
            self.bn_reset(model, data, j, (cid, round_))
            if o["proxy"] == "finetune":
                self._train(model, data, j, int(o["proxy_steps"]), float(o["proxy_lr"]), 0.0, (cid, round_, 7))
            with torch.no_grad():
                logits = model(val_x.to(self.torch_device)).cpu()
            if o["score"] == "accuracy":
                out.append(float((logits.argmax(1) == val_y).double().mean()))
            else:
                out.append(-float(F.cross_entropy(logits, val_y)))
        return np.array(out)

    # ---- server side --------------------------------------------------------------------------

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        """Test accuracy and loss of the global model on the held-out distorted digits, its
        FLOPs and its widths."""
        params = {n: v[0] for n, v in models.items()}
        images, targets = self._test
        logits = self._logits({n: v for n, v in params.items() if n != SCORES_KEY}, images)
        widths = self.widths_of(params)
        f = flops(self.arch, widths)
        out = {"accuracy": float((logits.argmax(1) == targets).double().mean()),
               "test_loss": float(F.cross_entropy(logits, targets)),
               "mflops": f / 1e6, "flops_cut": 1.0 - f / self.dense_flops}
        out.update({f"width_{i + 1}": float(w) for i, w in enumerate(widths)})
        return out

    def final_report(self, models: Params) -> dict[str, Any]:
        """The point of the accuracy-FLOPs plot, the widths and the search's mean scores."""
        params = {n: v[0] for n, v in models.items()}
        m = self.central_metrics(models)
        return {"tradeoff": {"x": m["mflops"], "y": m["accuracy"], "x_label": "MFLOPs (conv + linear MACs)",
                             "y_label": "test accuracy"},
                "widths": self.widths_of(params).tolist(),
                "dense_widths": list(self.arch.block_widths),
                "search_scores": np.asarray(params[SCORES_KEY], np.float64).tolist()}


def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)
