"""Client workloads: one module per method, all behind the contract in ``workloads.base``.

The registry names each built-in workload's class by import path; it is imported on first
use, so a run of one workload never pays for another's dependencies (torch, for instance).
``run.workload`` may also name any importable class, ``package.module:Class`` (your own
workload: it must be importable on every machine that runs a client). Every class is
checked against the contract when it is first resolved (``check_contract``): a missing
member of the core or of a declared capability is named in a ``WorkloadContractError``.
"""

from __future__ import annotations

from importlib import import_module

from workloads.base import Workload, WorkloadContractError, check_contract

WORKLOADS: dict[str, str] = {
    "mixed_regression": "workloads.mixed_regression:MixedRegression",
    "active_learning": "workloads.active_learning:ActiveLearning",
    "koopman_burgers": "workloads.koopman:KoopmanBurgers",
    "backdoor_distillation": "workloads.backdoor:BackdoorDistillation",
    "ccgc_clustering": "workloads.ccgc:CCGCClustering",
    "mgtab_bots": "workloads.mgtab:MGTABBots",
    "snf_pruning": "workloads.snf:SNFPruning",
    "ceco_segmentation": "workloads.ceco:CeCoSegmentation",
    "pmt_iqa": "workloads.pmt_iqa:PMTIQA",
    "sstam_video": "workloads.sstam:SSTAMVideo",
}

_checked: dict[str, type[Workload]] = {}


def is_workload_name(name: str) -> bool:
    """A built-in name, or something shaped like an import path (``module:Class``)."""
    return name in WORKLOADS or (":" in name and all(name.partition(":")[::2]))


def workload_class(name: str) -> type[Workload]:
    """The class of a built-in workload or of ``package.module:Class``, checked against the
    contract. Raises ``ValueError`` for an unknown name or a path that does not import, and
    ``WorkloadContractError`` naming what a class lacks."""
    if name in _checked:
        return _checked[name]
    if not is_workload_name(name):
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)} "
                         "or an import path package.module:Class")
    module, _, attribute = WORKLOADS.get(name, name).partition(":")
    try:
        cls = getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"workload {name!r} does not import: {err}") from None
    check_contract(cls)
    _checked[name] = cls
    return cls


__all__ = ["WORKLOADS", "Workload", "WorkloadContractError", "is_workload_name", "workload_class"]
