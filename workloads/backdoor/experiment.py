"""The backdoor federation's server side, evaluated offline on the clients' final uploads.

``distil`` advances the clients' own distillation (``update_state``, the workload code of the
Flower run) with no server in between, so the honest clients are distilled once for all arms:
they are the same in the clean, NAIVE and DOORPING arms of one seed, only the malicious
clients differ. ``evaluate_arm`` then compares the server's options on the final synthetic
sets (no round loop: the victim trains once on the union):

- ``none``: the model trained on the union of all uploads;
- ``spectral`` / ``activation-clustering``: the union without the clients the defense flags
  (their true and false positive rates);
- ``neural-cleanse``: the anomaly index of the undefended model and whether it names the
  target class;
- ``fine-pruning``: the undefended model pruned and fine-tuned on the server's clean images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workloads.backdoor import CLEAN, NC_IMAGES, BackdoorDistillation, Shards, defenses
from workloads.backdoor.model import accuracy, attack_success, from_parameters
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


def with_attack(scenario: dict[str, Any], attack: str) -> dict[str, Any]:
    return {**scenario, "backdoor": {**scenario["backdoor"], "attack": attack}}


def arms(scenario: dict[str, Any], rounds: int, attacks: tuple[str, ...] = ("naive", "doorping")) -> dict[str, Uploads]:
    """Uploads of the clean arm and of each attack, the honest clients distilled once."""
    base = BackdoorDistillation(scenario)
    bad = sorted(base.malicious)
    honest = distil(base, [c for c in range(base.num_clients) if c not in base.malicious], CLEAN, rounds)
    out = {CLEAN: merge(honest, distil(base, bad, CLEAN, rounds))}
    for attack in attacks:
        out[attack] = merge(honest, distil(BackdoorDistillation(with_attack(scenario, attack)), bad, attack, rounds))
    return out


def evaluate_arm(wl: BackdoorDistillation, uploads: Uploads, trigger: np.ndarray, malicious: set[int],
                 round_: int) -> dict[str, dict[str, Any]]:
    """CTA/ASR with no defense and under each defense, with detection rates."""
    wl.trigger = trigger * wl.mask
    x_test, y_test = wl.test
    xt = wl.triggered_test()
    target = wl.attack.target

    def score(params: Params) -> dict[str, float]:
        net = from_parameters(params)
        return {"cta": accuracy(net, x_test, y_test), "asr": attack_success(net, xt, y_test, target)}

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
