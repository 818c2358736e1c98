"""The layout's promises, checked on the source: arrows point one way, random-stream tags
are unique, and every built-in workload honours the contract."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the project folders it must never import (DESIGN.md's arrows:
# umbel -> simulations, deployment -> server, client -> strategies, workloads; proto is a leaf)
FORBIDDEN = {
    "proto": {"umbel", "simulations", "deployment", "server", "client", "strategies", "workloads"},
    "workloads": {"umbel", "simulations", "deployment", "server", "client", "strategies"},
    "strategies": {"umbel", "simulations", "deployment", "server", "client", "workloads"},
    "client": {"umbel", "simulations", "deployment", "server", "strategies"},
    "server": {"umbel", "simulations", "deployment", "client"},
    "deployment": {"umbel", "simulations"},
    "simulations": {"umbel"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_one_way(folder):
    bad = [f"{path.relative_to(ROOT)} imports {sorted(imported_packages(path) & FORBIDDEN[folder])}"
           for path in sorted((ROOT / folder).rglob("*.py")) if imported_packages(path) & FORBIDDEN[folder]]
    assert not bad, "\n".join(bad)


def test_workloads_know_nothing_of_flower_messages():
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "workloads").rglob("*.py"))
             if "flwr" in imported_packages(p)]
    assert not users, users


def test_random_stream_tags_are_unique():
    from workloads import streams

    tags = streams.all_tags()
    assert len(set(tags.values())) == len(tags), tags


def test_every_builtin_workload_honours_the_contract():
    from workloads import WORKLOADS, workload_class

    for name in WORKLOADS:
        assert workload_class(name).name == name


def test_a_workload_missing_members_is_refused_with_each_member_named():
    from workloads.base import DeviceFiles, Stateful, Workload, WorkloadContractError, check_contract

    class Half(Workload, Stateful, DeviceFiles):
        name, section, schema, key_metric = "half", "half", {}, "loss"

        def client_data(self, client_ids): ...

        def initial_state(self, data): ...

    with pytest.raises(WorkloadContractError) as err:
        check_contract(Half)
    message = str(err.value)
    for missing in ("core: initial_parameters()", "core: local_loss()", "core: local_train()", "core: subset()",
                    "Stateful: update_state()", "Stateful: with_state()", "DeviceFiles: device_format",
                    "DeviceFiles: read_device_files()"):
        assert missing in message
    assert "client_data" not in message and "initial_state" not in message
    with pytest.raises(WorkloadContractError, match="not a subclass"):
        check_contract(dict)
