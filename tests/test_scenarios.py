"""Scenario files, overrides and bad input: each stops with the field named, exit code 2."""

import pytest
from typer.testing import CliRunner

from server.run_config import ScenarioError, resolve, scenario_from_run_config
from simulations.scenarios import builtin_scenarios, load_scenario, parse_override
from umbel.cli import app

runner = CliRunner()


def test_builtins_resolve_and_default_is_the_documented_job():
    for name in builtin_scenarios():
        load_scenario(name)
    s = load_scenario("default")
    assert s["federation"]["clients"] == 1000 and s["federation"]["size_law"] == "zipf"
    assert s["run"]["strategies"] == ["clustered-second-order", "clustered-soft", "clustered-fedavg",
                                      "clustered-fedprox", "ifca", "fedavg", "oracle"]
    assert s["strategy"]["clustered-soft"] == {"use": "clustered-fedavg", "refine": "second-order",
                                                 "assignment": "soft", "reply": "clients"}
    assert s["strategy"]["clustered-second-order"] == {"use": "clustered-fedavg", "refine": "second-order",
                                                         "reply": "sums"}


def test_pyproject_run_config_is_the_default_scenario():
    """`flwr run .` reads [tool.flwr.app.config]: two keys, the built-in default scenario by
    name and nothing to resume (`umbel deploy run` sends the resolved scenario as TOML text)."""
    import tomllib
    from pathlib import Path

    config = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == {"scenario": "default", "resume": ""}
    assert scenario_from_run_config(config) == (load_scenario("default"), None)


def test_overrides_and_seed():
    s = load_scenario("tiny", ["federation.clients=80", "run.strategies=['fedprox']"], seed=9)
    assert s["federation"]["clients"] == 80 and s["run"]["strategies"] == ["fedprox"]
    assert s["federation"]["seed"] == 9
    assert parse_override("run.name=my run") == ("run", "name", "my run")


@pytest.mark.parametrize(
    "override, field, expected",
    [
        ("federation.clientz=3", "federation.clientz", "unknown key"),
        ("federaton.clients=3", "federaton", "unknown section"),
        ("federation.clients='many'", "federation.clients", "expected int, got str"),
        ("federation.clients=2.5", "federation.clients", "expected int, got float"),
        ("federation.clients=0", "federation.clients", "must be > 0"),
        ("federation.min_size=-1", "federation.min_size", "must be > 0"),
        ("federation.cohort_size=0", "federation.cohort_size", "must be > 0"),
        ("federation.max_size=0", "federation.max_size", "must be > 0"),
        ("federation.size_law='pareto'", "federation.size_law", "not one of"),
        ("mixed_regression.clusters=100", "mixed_regression.clusters", "expected clusters <= clients"),
        ("mixed_regression.noise=-0.1", "mixed_regression.noise", "must be >= 0"),
        ("mixed_regression.cluster_weights=[1, 2, 3]", "mixed_regression.cluster_weights", "one per cluster"),
        ("run.strategies=['fedsgd']", "run.strategies", "unknown strategy 'fedsgd'"),
        ("run.rounds=true", "run.rounds", "expected int, got bool"),
        ("federation.min_size=30", "federation.max_size", "below min_size 30"),
    ],
)
def test_bad_values_name_the_field(override, field, expected):
    with pytest.raises(ScenarioError) as err:
        load_scenario("tiny", [override])
    assert any(name == field and expected in msg for name, msg in err.value.problems), str(err.value)


def test_missing_required_key():
    with pytest.raises(ScenarioError, match="federation.clients: missing"):
        resolve({"run": {"rounds": 2}})


def test_bad_override_syntax():
    with pytest.raises(ScenarioError, match="expected section.key=value"):
        parse_override("rounds=3")


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    cases = [
        ["run", "tiny", "--set", "federation.clients=0"],
        ["run", "tiny", "--set", "mixed_regression.clusters=61"],
        ["run", "tiny", "--set", "run.bogus=1"],
        ["run", str(tmp_path / "missing.toml")],
    ]
    for args in cases:
        result = runner.invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 2, (args, result.output)
        assert "error" in result.output
        assert not out.exists()


def test_cli_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nclients = -5\n")
    result = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert str(bad) in result.output and "federation.clients" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[federation\n")
    result = runner.invoke(app, ["run", str(broken)])
    assert result.exit_code == 2 and "not valid TOML" in result.output


def test_cli_lists_scenarios():
    result = runner.invoke(app, ["scenarios"])
    assert result.exit_code == 0 and "default" in result.output and "tiny" in result.output


def test_cli_report_on_a_non_run_dir(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "history.json is missing" in result.output
