"""The backdoor federation's server side, evaluated offline on the clients' final uploads.

``distil`` advances the clients' own distillation (``update_state``, the workload code of the
Flower run) with no server in between, so the honest clients are distilled once for all arms:
they are the same in the clean, NAIVE and DOORPING arms of one seed, only the malicious
clients differ. ``evaluate_arm`` then compares the server's options on the final synthetic
sets (no round loop: the victim trains once on the union):

- ``none``: the model trained on the union of all uploads;
- ``spectral`` / ``activation-clustering`` / ``range-check``: the union without the clients
  the defense flags (their true and false positive rates);
- ``range-clip``: the union with every pixel clipped into the data's valid range;
- ``neural-cleanse``: the anomaly index of the undefended model and whether it names the
  target class;
- ``fine-pruning``: the undefended model pruned and fine-tuned on the server's clean images.

Besides the clean arm and the two attacks, two arms answer whether DOORPING works because its
trigger is optimised or because it is large (its unclamped trigger ends far outside the pixel
range): ``doorping-clamped`` keeps the trigger in the valid range, and ``naive-large`` is
NAIVEATTACK with DOORPING's final trigger fixed from the start (magnitude-matched control).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workloads.backdoor import CLEAN, NC_IMAGES, BackdoorDistillation, Shards, defenses
from workloads.backdoor.data import stamp
from workloads.backdoor.distill import Attack
from workloads.backdoor.model import accuracy, attack_success, attack_success_all, fresh, from_parameters, train_full_batch
from workloads.base import REQUIRED, ConfigField

Params = dict[str, np.ndarray]


@dataclass
class Uploads:
    """Every client's final synthetic set in one arm, and the attacker's trigger."""

    images: dict[int, np.ndarray] = field(default_factory=dict)
    labels: dict[int, np.ndarray] = field(default_factory=dict)
    trigger: np.ndarray | None = None

    def union(self, leave_out: frozenset[int] = frozenset()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = [c for c in sorted(self.images) if c not in leave_out]
        return (np.concatenate([self.images[c] for c in ids]), np.concatenate([self.labels[c] for c in ids]),
                np.concatenate([np.full(len(self.labels[c]), c) for c in ids]))


def distil(workload: BackdoorDistillation, clients: list[int], variant: str, rounds: int) -> Uploads:
    """The clients' synthetic sets after ``rounds`` rounds of their own distillation (all
    clients take part; synthetic uploads do not depend on the server's model)."""
    data = workload.client_data(np.asarray(clients))
    state = workload.initial_state(data)
    for rnd in range(1, rounds + 1):
        state, _ = workload.update_state({}, data, state, rnd, variant, np.ones(len(clients), bool))
    out = Uploads()
    for j, c in enumerate(clients):
        out.images[c], out.labels[c] = state["syn_images"][j], state["syn_labels"][j]
    probe = workload.evaluation_probe(data, state, variant)
    out.trigger = None if probe is None else probe["trigger"]
    return out


def merge(*parts: Uploads) -> Uploads:
    out = Uploads()
    for part in parts:
        out.images.update(part.images)
        out.labels.update(part.labels)
        out.trigger = part.trigger if part.trigger is not None else out.trigger
    return out


def with_attack(scenario: dict[str, Any], attack: str, **options: Any) -> dict[str, Any]:
    return {**scenario, "backdoor": {**scenario["backdoor"], "attack": attack, **options}}


CLAMPED = "doorping-clamped"  # DOORPING with its trigger kept in the valid pixel range
LARGE = "naive-large"  # NAIVEATTACK with DOORPING's final trigger, fixed from the start
ATTACK_ARMS = ("naive", "doorping", CLAMPED, LARGE)  # in an order that has DOORPING before LARGE


class PresetTrigger(BackdoorDistillation):
    """The workload whose attackers start from a given trigger (and, under NAIVEATTACK,
    keep it): the magnitude-matched control of DOORPING."""

    def __init__(self, scenario: dict[str, dict[str, Any]], trigger: np.ndarray) -> None:
        super().__init__(scenario)
        self.preset = np.asarray(trigger, np.float32) * self.mask

    def first_trigger(self, attack: Attack, rng: np.random.Generator) -> np.ndarray:
        return self.preset.copy() if attack.kind != "none" else super().first_trigger(attack, rng)


def attacker(scenario: dict[str, Any], arm: str, doorping_trigger: np.ndarray | None = None) -> BackdoorDistillation:
    """The workload an arm's malicious clients run (``arm`` in ``ATTACK_ARMS``)."""
    if arm == CLAMPED:
        return BackdoorDistillation(with_attack(scenario, "doorping", clamp=True))
    if arm == LARGE:
        if doorping_trigger is None:
            raise ValueError(f"arm {LARGE!r} needs DOORPING's final trigger")
        return PresetTrigger(with_attack(scenario, "naive"), doorping_trigger)
    return BackdoorDistillation(with_attack(scenario, arm))


def arms(scenario: dict[str, Any], rounds: int, attacks: tuple[str, ...] = ("naive", "doorping"),
         honest: Uploads | None = None) -> dict[str, Uploads]:
    """Uploads of the clean arm and of each attack arm, the honest clients distilled once
    (or given: only the attackers' distillation depends on the attack)."""
    unknown = [a for a in attacks if a not in ATTACK_ARMS]
    if unknown:
        raise ValueError(f"unknown arm {unknown[0]!r}; expected some of {list(ATTACK_ARMS)}")
    base = BackdoorDistillation(scenario)
    bad = sorted(base.malicious)
    if honest is None:
        others = [c for c in range(base.num_clients) if c not in base.malicious]
        honest = distil(base, others, CLEAN, rounds) if others else Uploads()
    out = {CLEAN: merge(honest, distil(base, bad, CLEAN, rounds))}
    for arm in sorted(attacks, key=ATTACK_ARMS.index):
        doorping = out.get("doorping")
        if arm == LARGE and doorping is None:
            raise ValueError(f"arm {LARGE!r} needs the 'doorping' arm too")
        workload = attacker(scenario, arm, None if doorping is None else doorping.trigger)
        out[arm] = merge(honest, distil(workload, bad, arm, rounds))
    return out


def honest_part(uploads: Uploads, malicious: set[int]) -> Uploads:
    """The honest clients' uploads of an arm."""
    keep = [c for c in uploads.images if c not in malicious]
    return Uploads({c: uploads.images[c] for c in keep}, {c: uploads.labels[c] for c in keep})


# The paper's threat model as overrides of the backdoor-doorping scenario: one distiller holds
# the whole training split (2% poisoned, ipc 10, as the spec's pilot) and the victim trains on
# its synthetic set alone; ``arms(scenario, 1, ...)`` distils it.
ONE_DISTILLER = ("federation.clients=1", "backdoor.ipc=10", "backdoor.portion=0.02", "backdoor.server_epochs=300",
                 "backdoor.server_lr=0.01", "backdoor.iterations_per_round=20")


def scores(net: Any, wl: BackdoorDistillation, trigger: np.ndarray) -> dict[str, float]:
    """A model's CTA, its ASR as the paper and as its code count it, and its ASR under the
    trigger clipped into the valid pixel range (what an image could carry)."""
    x, y = wl.test
    target = wl.attack.target
    triggered = stamp(x, wl.mask, trigger * wl.mask)
    in_range = stamp(x, wl.mask, defenses.clip_to_range(trigger * wl.mask, wl.bounds))
    return {"cta": accuracy(net, x, y), "asr": attack_success(net, triggered, y, target),
            "asr_all": attack_success_all(net, triggered, target),
            "asr_trigger_in_range": attack_success(net, in_range, y, target)}


def victims(wl: BackdoorDistillation, images: np.ndarray, labels: np.ndarray, trigger: np.ndarray,
            inits: int = 3) -> dict[str, float]:
    """The paper's evaluation: victims of ``inits`` initialisations trained from scratch on a
    synthetic set (the workload's ``server_epochs`` / ``server_lr``), their mean ``scores``."""
    runs = [scores(train_full_batch(fresh(1000 + init), images, labels, int(wl.options["server_epochs"]),
                                    float(wl.options["server_lr"])), wl, trigger) for init in range(inits)]
    return {name: float(np.mean([r[name] for r in runs])) for name in runs[0]}


def evaluate_arm(wl: BackdoorDistillation, uploads: Uploads, trigger: np.ndarray, malicious: set[int],
                 round_: int) -> dict[str, dict[str, Any]]:
    """CTA/ASR with no defense and under each defense, with detection rates."""
    wl.trigger = trigger * wl.mask
    target = wl.attack.target

    def score(params: Params) -> dict[str, float]:
        return scores(from_parameters(params), wl, wl.trigger)

    def rates(flagged: list[int]) -> dict[str, float | None]:
        clients = set(uploads.images)
        bad, good = clients & malicious, clients - malicious
        return {"tpr": len(set(flagged) & bad) / len(bad) if bad else None,
                "fpr": len(set(flagged) & good) / len(good) if good else None, "flagged": sorted(flagged)}

    images, labels, owners = uploads.union()
    params, flags = wl.server_train(images, labels, owners, round_)
    rows: dict[str, dict[str, Any]] = {"none": score(params)}
    for name, flagged in flags.items():
        if set(uploads.images) <= set(flagged):  # nothing left to train on
            rows[name] = {"cta": None, "asr": None, **rates(flagged)}
            continue
        retrained, _ = wl.server_train(*uploads.union(frozenset(flagged)), round_)
        rows[name] = {**score(retrained), **rates(flagged)}
    clipped, _ = wl.server_train(defenses.clip_to_range(images, wl.bounds), labels, owners, round_)
    rows["range-clip"] = score(clipped)
    nc = defenses.neural_cleanse(params, wl.holdout[0][:NC_IMAGES], seed=wl.seed)
    rows["neural-cleanse"] = {**rows["none"], "anomaly": float(max(nc.anomaly)),
                              "flagged_class": nc.flagged_class,
                              "detected": nc.flagged_class == target}
    repaired, info = defenses.fine_prune(params, *wl.holdout, seed=wl.seed)
    rows["fine-pruning"] = {**score(repaired), **{k: v for k, v in info.items() if isinstance(v, (int, float))}}
    return rows


def save_uploads(uploads: dict[str, Uploads], path: Path) -> None:
    """Every arm's final synthetic sets and trigger, to re-run the server side on them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{arm}/{kind}/{c}": v for arm, up in uploads.items()
              for kind, per in (("images", up.images), ("labels", up.labels)) for c, v in per.items()}
    arrays.update({f"{arm}/trigger": up.trigger for arm, up in uploads.items() if up.trigger is not None})
    np.savez_compressed(path, **arrays)


def load_uploads(path: Path) -> dict[str, Uploads]:
    z = np.load(path)
    out: dict[str, Uploads] = {}
    for key in z.files:
        arm, kind, *client = key.split("/")
        up = out.setdefault(arm, Uploads())
        if kind == "trigger":
            up.trigger = z[key]
        else:
            getattr(up, kind)[int(client[0])] = z[key]
    return out


class FixedUploads(BackdoorDistillation):
    """The backdoor workload with each client holding a saved synthetic set (``save_uploads``)
    that it does not distil further: weight uploads trained on fixed synthetic data, run
    through the round engine like any workload (``run.workload =
    "workloads.backdoor.experiment:FixedUploads"``)."""

    schema = {
        **BackdoorDistillation.schema,
        "uploads": ConfigField(str, REQUIRED, "an .npz of every arm's synthetic sets (save_uploads)"),
        "uploads_arm": ConfigField(str, REQUIRED, "the arm whose synthetic sets the clients hold"),
    }

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        super().__init__(scenario)
        self.saved = load_uploads(Path(self.options["uploads"]))[self.options["uploads_arm"]]

    def initial_state(self, data: Shards) -> dict[str, np.ndarray]:
        state = super().initial_state(data)
        for j, client in enumerate(data.client_ids.tolist()):
            state["syn_images"][j], state["syn_labels"][j] = self.saved.images[client], self.saved.labels[client]
            if client in self.malicious and self.saved.trigger is not None:
                state["trigger"][j] = self.saved.trigger
        return state

    def update_state(self, model: dict[str, np.ndarray], data: Shards, state: dict[str, np.ndarray],
                     round_: int, variant: str, active: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
        return state, {"trigger_updates": np.zeros(len(data.client_ids))}
