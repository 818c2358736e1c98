"""Client workloads: one module per method, all behind the contract in ``workloads.base``."""

from workloads.base import Workload
from workloads.mixed_regression import MixedRegression

WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (MixedRegression,)}


def workload_class(name: str) -> type[Workload]:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}") from None
