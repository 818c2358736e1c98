"""The backdoor federation in one process, for benchmarks and statistical tests.

It runs the same workload code as the Flower run (``update_state`` distils, ``server_train``
trains the victim, ``central_metrics`` scores it) without the message layer, and distils the
honest clients once for all arms: they are the same in the clean, NAIVE and DOORPING arms of
one seed, only the malicious clients differ. Rows compare, on the final synthetic sets:

- ``none``: the model trained on the union of all uploads;
- ``spectral`` / ``activation-clustering``: the union without the clients the defense flags
  (their true and false positive rates);
- ``neural-cleanse``: the anomaly index of the undefended model and whether it names the
  target class;
- ``fine-pruning``: the undefended model pruned and fine-tuned on the server's clean images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workloads.backdoor import CLEAN, NC_IMAGES, BackdoorDistillation, defenses
from workloads.backdoor.model import accuracy, attack_success, from_parameters

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
    """The clients' synthetic sets after ``rounds`` rounds (all clients take part)."""
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
