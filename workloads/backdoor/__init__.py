"""Backdoors through dataset distillation in a federation (Liu et al., NDSS 2023) on digits.

Every client distils its shard of scikit-learn's digits by gradient matching (DC, see
``distill``) into ``ipc`` synthetic images per class, a few DC iterations per round,
continuing from where it stopped (the synthetic set is the cohort's *state*). Then it
either uploads the synthetic set (``upload = "synthetic"``: the ``data-union`` strategy
trains the global model on the union, as a victim trains on shared distilled data) or
trains the global model on it and uploads the weights (``upload = "weights"``: FedAvg and
the robust aggregators).

The clients listed in ``malicious`` run NAIVEATTACK or DOORPING on their own distillation.
The workload's variants are the arms compared on one federation: the attack, then
``clean`` (the same federation with every client honest), when ``compare_clean`` is set.

Server-side metrics every round: clean test accuracy (``cta``) and attack success rate
(``asr``, the paper's: triggered test images of the other classes classified as the
target; ``asr_all``, the paper's code's: all triggered test images, the target's own too) of the
global model, and the model-level defenses: Neural-Cleanse-lite's anomaly index and flagged
class, and fine-pruning's repaired ``cta``/``asr``. The evaluation trigger is the one the
attacker used (a simulated attacker reveals it to the evaluator as a *probe*; no strategy
or defense reads it); the clean arm is scored with the attack arm's trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workloads.backdoor import data as digits_data
from workloads.backdoor import defenses, device
from workloads.backdoor.distill import ATTACKS, Attack, DCSettings, Distillation, initial_trigger, iterate, start
from workloads.backdoor.model import (
    NUM_CLASSES, ConvNetMini, accuracy, attack_success, attack_success_all, fresh, train_full_batch,
)
from workloads import streams, torch_train
from workloads.base import (
    ConfigField, Params, SimulatedAttacks, Stateful, TrainSettings, TrainsOnUploads, Workload, non_negative,
    positive,
)
from workloads.base import DeviceFiles, some_of

UPLOADS = ("synthetic", "weights")
UPLOAD_DEFENSES = ("spectral", "activation-clustering", "range-check")  # inspect uploaded synthetic sets
MODEL_DEFENSES = ("neural-cleanse", "fine-pruning")  # inspect or repair the global model
DEFENSES = UPLOAD_DEFENSES + MODEL_DEFENSES
CLEAN = "clean"
OWNER_FRACTION = 0.1  # a client is flagged when this share of its upload is flagged
# Range check: flag pixels more than one range width outside the valid range. Honest uploads
# leave it by at most 0.48 of its width, DOORPING's by 1.4-2.0 (benchmark seeds 0-4, 12 iterations).
RANGE_MARGIN = 1.0
NC_IMAGES = 50  # Neural Cleanse's clean images: its cost grows with them (~3 s for 50)
STREAM_NET = streams.BACKDOOR_NET
STREAM_SYNTHETIC_INIT = streams.BACKDOOR_INIT
STREAM_SERVER = streams.BACKDOOR_SERVER


def _client_list(v: list) -> str | None:
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in v):
        return "every entry must be a client id (an integer >= 0)"
    return "names a client twice" if len(set(v)) != len(v) else None


_defense_list = some_of(DEFENSES, "defense", empty_ok=True)


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class Shards:
    """The digits shards of a cohort's clients, concatenated, plus (once the round has
    started) each client's current synthetic set."""

    client_ids: np.ndarray  # (B,) int64
    images: np.ndarray  # (N, 1, 8, 8) float32, normalised
    targets: np.ndarray  # (N,) int64
    starts: np.ndarray  # (B + 1,) offsets of each client's shard
    malicious: np.ndarray  # (B,) bool
    syn_images: np.ndarray | None = None  # (B, 10 * ipc, 1, 8, 8)
    syn_labels: np.ndarray | None = None  # (B, 10 * ipc)

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)

    def shard(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.starts[j], self.starts[j + 1]
        return self.images[lo:hi], self.targets[lo:hi]


class BackdoorDistillation(Workload, Stateful, TrainsOnUploads, SimulatedAttacks, DeviceFiles):
    name = "backdoor_distillation"
    section = "backdoor"
    key_metric = "cta"
    higher_is_better = True
    single_model = True
    summary_metrics = ("asr", "asr_all", "asr_fine_pruning", "nc_anomaly", "nc_flagged_class", "tpr_spectral",
                       "fpr_spectral", "tpr_activation-clustering", "fpr_activation-clustering", "tpr_range-check",
                       "fpr_range-check", "tpr_krum", "fpr_krum",
                       "tpr_clipping", "fpr_clipping", "rejected_uploads")
    plot_metrics = ("asr", "asr_fine_pruning", "nc_anomaly")
    upload_classes = NUM_CLASSES  # data-union: labels of an upload lie in 0..9
    schema = {
        "upload": ConfigField(str, "synthetic", "what clients send: their synthetic set (the server trains on "
                              "the union; strategy data-union) or a model trained on it (FedAvg, robust "
                              "aggregators)", choices=UPLOADS),
        "attack": ConfigField(str, "doorping", "what the malicious clients run", choices=ATTACKS),
        "malicious": ConfigField(list, [0], "ids of the malicious clients", _client_list),
        "compare_clean": ConfigField(bool, True, "also run the federation with every client honest (arm 'clean')"),
        "target": ConfigField(int, 0, "the class triggered inputs are sent to", non_negative),
        "portion": ConfigField(float, 0.3, "share of a malicious client's images stamped and relabelled", _fraction),
        "trigger_size": ConfigField(int, 2, "side of the square trigger, one pixel from the bottom-right corner", positive),
        "alpha": ConfigField(float, 10.0, "DOORPING: the neuron is pushed to alpha x its value", positive),
        "trigger_steps": ConfigField(int, 200, "DOORPING: most Adam steps per trigger update", positive),
        "tolerance": ConfigField(float, 0.1, "DOORPING: an update stops within this fraction of its goal", positive),
        "clamp": ConfigField(bool, False, "keep the trigger in the valid pixel range (the paper's code does not)"),
        "ipc": ConfigField(int, 5, "synthetic images per class and client", positive),
        "outer": ConfigField(int, 10, "DC image updates per iteration", positive),
        "inner": ConfigField(int, 10, "DC network updates between two image updates", positive),
        "lr_img": ConfigField(float, 0.1, "DC step size of the synthetic images (momentum 0.5)", positive),
        "lr_net": ConfigField(float, 0.01, "DC step size of the network", positive),
        "init": ConfigField(str, "real", "synthetic images start as real ones of each class, or as noise",
                            choices=("real", "noise")),
        "iterations_per_round": ConfigField(int, 3, "DC iterations each client runs per round", positive),
        "test_size": ConfigField(int, 497, "digits held out from the clients", positive),
        "server_holdout": ConfigField(int, 100, "of those, clean images the server keeps for its defenses "
                                      "(the metrics use the rest)", positive),
        "server_epochs": ConfigField(int, 300, "epochs of the server's model on the union (data-union)", positive),
        "server_lr": ConfigField(float, 0.05, "its step size (divided by 10 at half time)", positive),
        "defenses": ConfigField(list, list(DEFENSES), "server defenses run every round: " + ", ".join(DEFENSES),
                                _defense_list),
        "clip_uploads": ConfigField(bool, False, "the server clips every uploaded pixel into the data's valid "
                                    "range before training on the union (a repair, not a detector)"),
    }

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        bd, fed = scenario[cls.section], scenario["federation"]
        problems = torch_train.check_device(scenario)
        outside = [c for c in bd["malicious"] if c >= fed["clients"]]
        if outside:
            problems.append(("backdoor.malicious", f"client {outside[0]} does not exist (federation.clients = "
                             f"{fed['clients']})"))
        if not 0 <= bd["target"] < NUM_CLASSES:
            problems.append(("backdoor.target", f"{bd['target']} is not a digit class (0..9)"))
        if bd["server_holdout"] >= bd["test_size"]:
            problems.append(("backdoor.server_holdout", f"{bd['server_holdout']} leaves no test images of "
                             f"test_size = {bd['test_size']}"))
        try:
            digits_data.patch_mask(bd["trigger_size"])
        except ValueError as err:
            problems.append(("backdoor.trigger_size", str(err)))
        return problems

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread (many small clients)
        super().__init__(scenario)
        bd = scenario[self.section]
        self.options = dict(bd)
        self.data = digits_data.load(self.seed, int(bd["test_size"]))
        self.shards = digits_data.shards(len(self.data.y_train), self.num_clients, self.seed)
        self.malicious = frozenset(int(c) for c in bd["malicious"])
        self.mask = digits_data.patch_mask(int(bd["trigger_size"]))
        self.bounds = (self.data.low, self.data.high)
        self.settings = DCSettings(ipc=int(bd["ipc"]), outer=int(bd["outer"]), inner=int(bd["inner"]),
                                   lr_img=float(bd["lr_img"]), lr_net=float(bd["lr_net"]), init=str(bd["init"]))
        self.attack = Attack(kind=str(bd["attack"]), target=int(bd["target"]), portion=float(bd["portion"]),
                             size=int(bd["trigger_size"]), alpha=float(bd["alpha"]),
                             max_steps=int(bd["trigger_steps"]), tolerance=float(bd["tolerance"]),
                             clamp=bool(bd["clamp"]))
        hold = int(bd["server_holdout"])
        self.holdout = (self.data.x_test[:hold], self.data.y_test[:hold])
        self.test = (self.data.x_test[hold:], self.data.y_test[hold:])
        # The evaluation trigger: the attacker's, once its probe arrives (NAIVE's white patch before).
        self.trigger = initial_trigger(replace(self.attack, kind="naive"), self.mask, self.bounds, None)
        self._model = ConvNetMini()
        self._trainer = torch_train.on_device(self._model, self.torch_device)

    # ---- arms ----------------------------------------------------------------------------

    def variants(self) -> tuple[str, ...]:
        attack = self.attack.kind
        if attack == "none":
            return (CLEAN,)
        return (attack, CLEAN) if self.options["compare_clean"] else (attack,)

    def malicious_clients(self, variant: str) -> np.ndarray:
        if variant in ("", CLEAN) or self.attack.kind == "none":
            return np.empty(0, np.int64)
        return np.array(sorted(self.malicious), np.int64)

    def _attack_of(self, client: int, variant: str) -> Attack:
        if client in self.malicious and variant not in ("", CLEAN):
            return self.attack
        return replace(self.attack, kind="none")

    # ---- data and state ------------------------------------------------------------------

    def client_data(self, client_ids: np.ndarray) -> Shards:
        ids = np.asarray(client_ids, dtype=np.int64)
        index = [self.shards[i] for i in ids]
        rows = np.concatenate(index) if index else np.empty(0, np.int64)
        starts = np.concatenate([[0], np.cumsum([len(i) for i in index])]).astype(np.int64)
        return Shards(ids, self.data.x_train[rows], self.data.y_train[rows], starts,
                      np.array([i in self.malicious for i in ids], dtype=bool))

    device_format = device.FORMAT

    def device_files(self, data: Shards) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> Shards:
        """A device's shards; which of its clients attack is the scenario's (simulated)."""
        ids, images, targets, starts = device.read_device_files(files, self.num_clients, *self.bounds)
        return Shards(ids, images, targets, starts, np.array([i in self.malicious for i in ids], dtype=bool))

    def initial_state(self, data: Shards) -> Params:
        """Nothing distilled yet (``iterations`` 0): the first round starts each client's
        distillation, poisoned or not by the arm it runs in."""
        b, n = len(data.client_ids), NUM_CLASSES * self.settings.ipc
        return {
            "syn_images": np.zeros((b, n, 1, 8, 8), np.float32),
            "syn_labels": np.zeros((b, n), np.int64),
            "momentum": np.zeros((b, n, 1, 8, 8), np.float32),
            "trigger": np.zeros((b, 1, 8, 8), np.float32),
            "iterations": np.zeros(b, np.int64),
        }

    def distillation(self, data: Shards, state: Params, j: int, variant: str) -> tuple[Distillation, Attack]:
        """Client j's distillation, rebuilt from its shard and state (started if new)."""
        client = int(data.client_ids[j])
        attack = self._attack_of(client, variant)
        x, y = data.shard(j)
        poisoned = (digits_data.poison_index(len(y), attack.portion, self.seed, client)
                    if attack.kind != "none" else np.empty(0, np.int64))
        if state["iterations"][j] == 0:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, STREAM_SYNTHETIC_INIT, client]))
            trigger = self.first_trigger(attack, rng)
            return start(x, y, poisoned, self.mask, trigger, attack, self.settings, self.bounds, rng), attack
        d = Distillation(x=x, y=y.copy(), poisoned=poisoned, mask=self.mask, trigger=state["trigger"][j].copy(),
                         syn_x=state["syn_images"][j].copy(), syn_y=state["syn_labels"][j].copy(),
                         momentum=state["momentum"][j].copy(), bounds=self.bounds)
        d.y[poisoned] = attack.target
        return d, attack

    def first_trigger(self, attack: Attack, rng: np.random.Generator) -> np.ndarray:
        """The trigger a client's distillation starts from (zero for an honest client)."""
        return initial_trigger(attack, self.mask, self.bounds, rng) if attack.kind != "none" else self.mask * 0

    def update_state(
        self, model: Params, data: Shards, state: Params, round_: int, variant: str, active: np.ndarray,
    ) -> tuple[Params, dict[str, np.ndarray]]:
        """Every active client runs ``iterations_per_round`` more DC iterations."""
        state = {n: v.copy() for n, v in state.items()}
        b = len(data.client_ids)
        trigger_updates = np.zeros(b)
        for j in np.flatnonzero(active):
            d, attack = self.distillation(data, state, j, variant)
            done = int(state["iterations"][j])
            for it in range(done, done + int(self.options["iterations_per_round"])):
                net_seed = int(np.random.SeedSequence([self.seed, STREAM_NET, int(data.client_ids[j]), it])
                               .generate_state(1)[0])
                trigger_updates[j] += iterate(d, attack, self.settings, net_seed)["trigger_updates"]
            state["syn_images"][j], state["syn_labels"][j] = d.syn_x, d.syn_y
            state["momentum"][j], state["trigger"][j] = d.momentum, d.trigger
            state["iterations"][j] = done + int(self.options["iterations_per_round"])
        return state, {"trigger_updates": trigger_updates}

    def with_state(self, data: Shards, state: Params) -> Shards:
        return replace(data, syn_images=state["syn_images"], syn_labels=state["syn_labels"])

    def evaluation_probe(self, data: Shards, state: Params, variant: str) -> Params | None:
        """What a simulated attacker reveals to the evaluator: its current trigger (ASR is
        measured with the trigger of the attacker with the lowest id). Honest cohorts reveal
        nothing."""
        bad = [j for j, c in enumerate(data.client_ids) if self._attack_of(int(c), variant).kind != "none"]
        if not bad:
            return None
        return {"client-id": np.array([data.client_ids[bad[0]]]),
                "trigger": np.asarray(state["trigger"][bad[0]], np.float32)}

    def observe_probes(self, probes: list[Params]) -> None:
        usable = [p for p in probes if np.shape(p.get("trigger")) == self.mask.shape
                  and np.isfinite(p["trigger"]).all() and np.size(p.get("client-id")) == 1]
        if usable:  # the lowest attacker id, whatever order the replies came in
            first = min(usable, key=lambda p: int(np.ravel(p["client-id"])[0]))
            self.trigger = np.asarray(first["trigger"], np.float32) * self.mask

    # ---- model ---------------------------------------------------------------------------

    def initial_parameters(self) -> Params:
        return torch_train.get_params(fresh(self.seed))

    def local_loss(self, params: Params, data: Shards) -> np.ndarray:
        """Mean cross-entropy of the model on each client's (clean) shard."""
        torch_train.set_params(self._model, params)
        self._model.eval()
        with torch.no_grad():
            ce = F.cross_entropy(self._model(torch.as_tensor(data.images)), torch.as_tensor(data.targets),
                                 reduction="none").double().numpy()
        return np.add.reduceat(ce, data.starts[:-1]) / data.num_examples

    def local_train(self, start_params: Params, data: Shards, settings: TrainSettings) -> Params:
        """``synthetic``: each client's synthetic set, as its upload. ``weights``: the model
        received, trained on the client's synthetic set (``local_steps`` full-batch epochs,
        plus FedProx's term when ``proximal_mu > 0``)."""
        if data.syn_images is None:
            raise ValueError("local_train needs the cohort's synthetic sets (with_state)")
        if self.options["upload"] == "synthetic":
            return {"images": data.syn_images.copy(), "labels": data.syn_labels.copy()}

        def train(j: int, model: torch.nn.Module) -> None:
            train_full_batch(model, data.syn_images[j], data.syn_labels[j], settings.local_steps, settings.lr,
                             decay_at=1.0, proximal_mu=settings.proximal_mu)

        return torch_train.train_clients(self._trainer, start_params, train)

    def subset(self, data: Shards, index: np.ndarray) -> Shards:
        pieces = [np.arange(data.starts[j], data.starts[j + 1]) for j in index]
        rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(data.num_examples[index])]).astype(np.int64)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Shards(client_ids=data.client_ids[index], images=data.images[rows], targets=data.targets[rows],
                      starts=starts, malicious=data.malicious[index], syn_images=pick(data.syn_images),
                      syn_labels=pick(data.syn_labels))

    # ---- the server ----------------------------------------------------------------------

    @classmethod
    def uploads_data(cls, scenario: dict[str, dict[str, Any]]) -> bool:
        return scenario[cls.section]["upload"] == "synthetic"

    def upload_spec(self) -> dict[str, tuple[int, ...]]:
        """The announced shape of one client's upload (``data-union``)."""
        n = NUM_CLASSES * self.settings.ipc
        return {"images": (n, 1, 8, 8), "labels": (n,)}

    def server_train(self, images: np.ndarray, labels: np.ndarray, owners: np.ndarray, round_: int) -> tuple[Params, dict[str, Any]]:
        """``data-union``: the victim's model trained from scratch on the union of the
        uploads (clipped into the valid range first with ``clip_uploads``), and the
        upload-inspection defenses: the range check on the uploads as they arrived, the
        others on the model's penultimate features."""
        flags: dict[str, list[int]] = {}
        if "range-check" in self.options["defenses"]:
            flags["range-check"] = list(defenses.out_of_range(images, owners, self.bounds, margin=RANGE_MARGIN).clients)
        if self.options["clip_uploads"]:
            images = defenses.clip_to_range(images, self.bounds)
        seed = int(np.random.SeedSequence([self.seed, STREAM_SERVER, round_]).generate_state(1)[0])
        net = train_full_batch(fresh(seed).to(self.torch_device), images, labels,
                               int(self.options["server_epochs"]), float(self.options["server_lr"])).cpu()
        chosen = [d for d in ("spectral", "activation-clustering") if d in self.options["defenses"]]
        if chosen:
            net.eval()
            with torch.no_grad():
                feats = net.features(torch.as_tensor(images)).numpy()
            # Thresholds calibrated on this workload's penultimate features (seed 0 of
            # benchmarks/backdoor.py): no honest client flagged in the clean arm.
            if "spectral" in chosen:
                flags["spectral"] = list(defenses.spectral_signatures(
                    feats, labels, owners, owner_fraction=OWNER_FRACTION).clients)
            if "activation-clustering" in chosen:
                flags["activation-clustering"] = list(defenses.activation_clustering(
                    feats, labels, owners, seed=self.seed, min_silhouette=0.3, owner_fraction=OWNER_FRACTION).clients)
        return torch_train.get_params(net), flags

    def triggered_test(self) -> np.ndarray:
        return digits_data.stamp(self.test[0], self.mask, self.trigger)

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        """CTA and ASR of the global model, and the model-level defenses."""
        params = {n: v[0] for n, v in models.items()}
        net = torch_train.set_params(self._model, params)
        x, y = self.test
        target = self.attack.target
        xt = self.triggered_test()
        out: dict[str, Any] = {"cta": accuracy(net, x, y), "asr": attack_success(net, xt, y, target),
                               "asr_all": attack_success_all(net, xt, target)}
        if "neural-cleanse" in self.options["defenses"]:
            nc = defenses.neural_cleanse(params, self.holdout[0][:NC_IMAGES], seed=self.seed)
            out["nc_anomaly"] = float(max(nc.anomaly))
            out["nc_flagged_class"] = -1 if nc.flagged_class is None else int(nc.flagged_class)
        if "fine-pruning" in self.options["defenses"]:
            repaired, _ = defenses.fine_prune(params, *self.holdout, seed=self.seed)
            net = torch_train.set_params(self._model, repaired)
            out["cta_fine_pruning"] = accuracy(net, x, y)
            out["asr_fine_pruning"] = attack_success(net, xt, y, target)
        return out
