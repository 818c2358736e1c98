"""Client workloads: one module per method, all behind the contract in ``workloads.base``.

The registry names each workload's module; it is imported on first use, so a run of one
workload never pays for another's dependencies (torch, for instance).
"""

from __future__ import annotations

from importlib import import_module

from workloads.base import Workload

WORKLOADS: dict[str, str] = {
    "mixed_regression": "workloads.mixed_regression:MixedRegression",
    "active_learning": "workloads.active_learning:ActiveLearning",
    "koopman_burgers": "workloads.koopman:KoopmanBurgers",
    "backdoor_distillation": "workloads.backdoor:BackdoorDistillation",
}


def workload_class(name: str) -> type[Workload]:
    try:
        module, _, cls = WORKLOADS[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}") from None
    return getattr(import_module(module), cls)
