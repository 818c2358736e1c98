"""Your own strategy on umbel's federations: Flower's server strategies by name, DP wrappers,
import paths, strategy objects from Python, robust per-cluster rules, and runs compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from server.record import load_history, load_models
from simulations.launcher import simulate
from simulations.reference import Reference
from simulations.scenarios import load_scenario
from strategies.aggregation import coordinate_median, krum, trimmed_mean
from umbel.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["federation.clients=24", "federation.cohort_size=8", "run.rounds=3"]
FLOWER_LABELS = ["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "qfedavg", "bulyan",
                 "dp-fs", "dp-fc", "dp-as", "dp-ac"]
FLOWER_SETTINGS = [
    "strategy.fedavgm.server_momentum=0.9", "strategy.bulyan.num_malicious_nodes=1",
    "strategy.dp-fs.use='dp-fixed-server'", "strategy.dp-fs.wraps='fedavg'",
    "strategy.dp-fs.noise_multiplier=0.1", "strategy.dp-fs.clipping_norm=10.0",
    "strategy.dp-fc.use='dp-fixed-client'", "strategy.dp-fc.wraps='fedadam'",
    "strategy.dp-fc.noise_multiplier=0.1", "strategy.dp-fc.clipping_norm=0.05",
    "strategy.dp-as.use='dp-adaptive-server'", "strategy.dp-as.wraps='fedyogi'", "strategy.dp-as.noise_multiplier=0.1",
    "strategy.dp-ac.use='dp-adaptive-client'", "strategy.dp-ac.wraps='fedavg'", "strategy.dp-ac.noise_multiplier=0.1",
]


def _strategies(labels: list[str]) -> str:
    return "run.strategies=[" + ", ".join(f'"{label}"' for label in labels) + "]"


@pytest.mark.slow
def test_every_named_flower_strategy_runs_through_flower_and_in_process_identically(ray_cluster, tmp_path):
    scenario = load_scenario("tiny", [*SMALL, _strategies(FLOWER_LABELS), *FLOWER_SETTINGS])
    run_dir = simulate(scenario, out=tmp_path, ray_address=ray_cluster)
    history = load_history(run_dir)
    assert history["status"] == "finished"
    ref = Reference(scenario)
    for label in FLOWER_LABELS:
        rows = ref.run(label)
        assert all(r.get("dropped", 0) == 0 for r in rows[1:]), (label, rows)
        np.testing.assert_array_equal(load_models(run_dir, label)["w"], rows[-1]["models"]["w"], err_msg=label)
        assert [r["estimation_error"] for r in history["strategies"][label]] == [r["estimation_error"] for r in rows]
    fedavg = load_models(run_dir, "fedavg")["w"]
    for label in ("fedadam", "fedyogi", "fedavgm", "dp-fs"):
        assert np.abs(load_models(run_dir, label)["w"] - fedavg).max() > 1e-3, label


def test_the_same_strategy_twice_with_different_settings_differs_and_each_label_is_recorded():
    scenario = load_scenario("tiny", [*SMALL, _strategies(["slow", "fast"]), "strategy.slow.use='fedadam'",
                                      "strategy.slow.eta=0.01", "strategy.fast.use='fedadam'", "strategy.fast.eta=0.5"])
    ref = Reference(scenario)
    slow, fast = ref.run("slow")[-1]["models"]["w"], ref.run("fast")[-1]["models"]["w"]
    assert np.abs(slow - fast).max() > 1e-2


def test_an_own_strategy_by_import_path_equals_the_same_object_handed_in_from_python(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from own_strategy import MedianNormFedAvg

    from strategies import catalog

    by_path = load_scenario("tiny", [*SMALL, _strategies(["mine"]), "strategy.mine.use='own_strategy:MedianNormFedAvg'"])
    from_path = Reference(by_path).run("mine")[-1]["models"]["w"]
    with catalog.live_strategies({"mine": MedianNormFedAvg()}):
        live = load_scenario("tiny", [*SMALL, _strategies(["mine"]), "strategy.mine.use='python'"])
        from_object = Reference(live).run("mine")[-1]["models"]["w"]
    np.testing.assert_array_equal(from_path, from_object)


BAD_STRATEGIES = [
    (["strategy.x.use='no_such_module:Rule'"], "strategy.x.use", "does not import"),
    (["strategy.x.use='numpy:ndarray'"], "strategy.x.use", "not a Flower Strategy"),
    (["strategy.x.use='flwr.serverapp.strategy:FedAvg'", "strategy.x.momentum=0.9"], "strategy.x.momentum",
     "unknown setting"),
    (["strategy.x.use='fedadam'", "strategy.x.etaa=0.1"], "strategy.x.etaa", "unknown setting"),
    (["strategy.x.use='fedadam'", "strategy.x.eta='fast'"], "strategy.x.eta", "expected float"),
    (["strategy.x.use='fedadam'", "strategy.x.eta=inf"], "strategy.x.eta", "finite"),
    (["strategy.x.use='dp-fixed-server'", "strategy.x.noise_multiplier=0.1", "strategy.x.clipping_norm=1.0"],
     "strategy.x.wraps", "wraps a single-model strategy"),
    (["strategy.x.use='dp-fixed-server'", "strategy.x.wraps='fedavg'"], "strategy.x.noise_multiplier", "missing"),
    (["strategy.x.use='fedadamm'"], "strategy.x.use", "unknown strategy 'fedadamm'"),
    (["strategy.x.use='clustered-fedavg'", "strategy.x.aggregate='mode'"], "strategy.x.aggregate", "expected one of"),
    (["strategy.x.use='python'"], "strategy.x.use", "no strategy object"),
]


@pytest.mark.parametrize("settings, field, says", BAD_STRATEGIES, ids=[s[0][0] for s in BAD_STRATEGIES])
def test_a_bad_strategy_fails_at_validation_with_exit_2_naming_the_field(settings, field, says, tmp_path):
    args = ["run", "tiny", "--out", str(tmp_path), "--set", 'run.strategies=["x"]']
    for item in settings:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert field in text and says in text, text


# ---- robust rules inside the clustered family -----------------------------------------------

def test_per_cluster_rules_weigh_clients_by_examples():
    models = np.array([[1.0], [2.0], [3.0], [100.0]])
    assert coordinate_median(models, np.ones(4))[0] == 2.0
    assert coordinate_median(models, np.array([1.0, 1.0, 5.0, 1.0]))[0] == 3.0  # most examples say 3
    assert trimmed_mean(models, np.ones(4), beta=0.25)[0] == pytest.approx(2.5)  # the tails cut
    np.testing.assert_allclose(trimmed_mean(models, np.array([1.0, 2.0, 3.0, 4.0]), beta=0.0),
                               np.average(models, axis=0, weights=[1, 2, 3, 4]))  # no cut: the mean
    assert krum(np.array([[0.0, 0], [0.1, 0], [0, 0.1], [9.0, 9]]), np.ones(4), malicious=1)[0] < 1


@pytest.mark.slow
def test_clustered_with_a_trimmed_mean_per_cluster_resists_scaled_updates_where_the_mean_does_not():
    """Default instance, seed 0: 10% of the clients send updates scaled by 10. Calibrated on
    seeds 0-2 (see the README's table): the trimmed mean stays within 1.2-1.3x of the clean
    clustered-fedavg, the mean goes to 1.6-2.0x."""
    clean = Reference(load_scenario("default", ['run.strategies=["clustered-fedavg"]']))
    clean_error = clean.run("clustered-fedavg", keep_models=False)[-1]["estimation_error"]
    attacked = Reference(load_scenario("default", [
        'run.strategies=["clustered-fedavg", "robust"]', "strategy.robust.use='clustered-fedavg'",
        "strategy.robust.aggregate='trimmed-mean'", "federation.scaled_update_fraction=0.1",
        "federation.scaled_update_factor=10.0"]))
    mean = attacked.run("clustered-fedavg", keep_models=False)[-1]["estimation_error"]
    robust = attacked.run("robust", keep_models=False)[-1]["estimation_error"]
    assert robust < 1.5 * clean_error < mean


# ---- the Python API, the example, and runs compared ------------------------------------------

def test_the_example_runs_a_new_rule_beside_fedavg_and_clustered_fedavg(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import own_strategy

    assert len((EXAMPLES / "own_strategy.py").read_text().splitlines()) <= 40
    run = own_strategy.main(rounds=2, ray_address=ray_cluster, out=str(tmp_path))
    assert run.arms == ["fedavg", "clustered-fedavg", "median-norm"]
    assert run.history["status"] == "finished" and "median-norm" in run.table()
    final = run.final()
    assert all(np.isfinite(v) for v in final.values())
    assert run.models("median-norm")["w"].shape == (1, 20)


def test_run_over_seeds_then_compare_two_runs(ray_cluster, tmp_path):
    result = CliRunner().invoke(app, ["run", "tiny", "--seeds", "0-2", "--out", str(tmp_path),
                                      "--ray-address", ray_cluster])
    assert result.exit_code == 0, result.output
    compared = next(tmp_path.glob("tiny-seeds-*"))
    table = (compared / "compare.md").read_text()
    assert "| tiny | fedavg | 0, 1, 2 |" in table and " ± " in table
    assert (compared / "compare_estimation_error.png").stat().st_size > 10_000
    runs = sorted(tmp_path.glob("tiny-2*"))[:2]
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    assert "| tiny | fedprox | 0, 1 |" in (tmp_path / "two" / "compare.md").read_text()
    bad = CliRunner().invoke(app, ["run", "tiny", "--seeds", "4-0", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "empty" in bad.output


def test_client_side_clipping_bounds_every_update_and_says_whom_it_clipped():
    from client.compute import clip_updates, scale_updates

    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((50, 4)), "b": rng.standard_normal((50, 2, 3))}
    trained = {n: v + rng.standard_normal(v.shape) * rng.uniform(0.01, 3, (50,) + (1,) * (v.ndim - 1))
               for n, v in start.items()}
    clipped, bits = clip_updates(trained, start, 1.0)
    norms = lambda models: np.sqrt(sum(((models[n] - start[n]).reshape(50, -1) ** 2).sum(axis=1) for n in start))
    before, after = norms(trained), norms(clipped)
    assert np.all(after <= 1.0 + 1e-12) and np.array_equal(bits == 1.0, before > 1.0)
    np.testing.assert_allclose(after[before <= 1.0], before[before <= 1.0])  # small updates untouched
    doubled = scale_updates(trained, start, np.full(50, 2.0))
    np.testing.assert_allclose(norms(doubled), 2 * before)


def test_the_clients_that_scale_their_updates_are_fixed_by_the_seed_whatever_the_cohorts():
    from workloads.federation import update_scales

    fed = {"seed": 3, "scaled_update_fraction": 0.1, "scaled_update_factor": 10.0}
    ids = np.arange(10_000)
    whole = update_scales(fed, ids)
    assert set(np.unique(whole)) == {1.0, 10.0} and abs((whole == 10.0).mean() - 0.1) < 0.01
    np.testing.assert_array_equal(np.concatenate([update_scales(fed, part) for part in np.array_split(ids, 7)]), whole)
    assert update_scales({**fed, "scaled_update_fraction": 0.0}, ids) is None


def weighted_mean(models: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A user's per-cluster rule (found by the test below through its import path)."""
    return np.average(models, axis=0, weights=weights)


def test_a_users_per_cluster_function_by_import_path_runs_inside_the_clustered_family():
    """Your own function as clustered.aggregate: the example-weighted mean written by hand
    lands where the built-in exact mean does, and the median lands elsewhere."""
    base = ["federation.clients=200", "federation.cohort_size=50", "run.rounds=5",
            'run.strategies=["clustered-fedavg", "mine", "median"]',
            "strategy.mine.use='clustered-fedavg'", f"strategy.mine.aggregate='{__name__}:weighted_mean'",
            "strategy.median.use='clustered-fedavg'", "strategy.median.aggregate='median'"]
    ref = Reference(load_scenario("default", base))
    exact, mine, median = (ref.run(label)[-1]["models"]["w"] for label in ("clustered-fedavg", "mine", "median"))
    np.testing.assert_allclose(mine, exact, rtol=0, atol=1e-12)
    assert np.abs(median - exact).max() > 1e-4


def test_simulate_takes_a_scenario_as_a_dict_and_refuses_a_bad_one_naming_the_field(ray_cluster, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from server.run_config import ScenarioError
    from umbel import simulate

    scenario = {"run": {"name": "as-dict", "rounds": 2, "strategies": ["fedavg"]},
                "federation": {"clients": 12, "cohort_size": 4}}
    run = simulate(scenario, strategies={"flower": FedAvg()}, overrides=["run.rounds=3"], seed=5,
                   out=tmp_path, ray_address=ray_cluster)
    assert run.arms == ["fedavg", "flower"] and run.history["seed"] == 5
    assert [r["round"] for r in run.rows("flower")] == [0, 1, 2, 3]
    # Flower's FedAvg on one reply per client is umbel's FedAvg, up to the order of the sum
    np.testing.assert_allclose(run.models("flower")["w"], run.models("fedavg")["w"], rtol=1e-12, atol=1e-15)
    with pytest.raises(ScenarioError, match="federation.clients"):
        simulate({**scenario, "federation": {"clients": 0}}, out=tmp_path, ray_address=ray_cluster)
