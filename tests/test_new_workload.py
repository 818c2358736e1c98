"""A new workload, written here and nowhere else, runs on umbel without touching server/,
client/ or strategies/: a toy torch workload (linear models in two clusters) under FedAvg and
under the clustered strategy with ``anchor-models`` through Flower, named in the scenario by
its import path. With one client sending an outlier it also shows that the reference runs
Flower's robust aggregators through their real classes, and that they equal Flower's runs.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from server.run_config import resolve
from simulations.reference import Reference
from workloads.base import ConfigField, Params, TrainSettings, Workload, positive
from workloads.torch_train import full_batch, get_params, minibatches, train_clients, train_steps

TOY = "tests.test_new_workload:ToyRegression"


# ---- the whole workload (40 lines) ------------------------------------------------------------
@dataclass(frozen=True)
class ToyCohort:
    client_ids: np.ndarray  # (B,)
    x: np.ndarray  # (B, n, dim)
    y: np.ndarray  # (B, n, 1)

    @property
    def num_examples(self) -> np.ndarray:
        return np.full(len(self.client_ids), self.x.shape[1])


class ToyRegression(Workload):
    """y = <w_c, x> + noise; client i is in cluster i % 2, w_c = +-1; client ``outlier`` (if
    >= 0) replies with every weight 100."""

    name, section, key_metric = "toy", "toy", "model_error"
    schema = {"dim": ConfigField(int, 3, "features", positive), "outlier": ConfigField(int, -1, "attacker id")}
    num_clusters = 2

    def __init__(self, scenario):
        super().__init__(scenario)
        self.dim, self.outlier = scenario["toy"]["dim"], scenario["toy"]["outlier"]
        torch.manual_seed(self.seed)
        self.model = torch.nn.Linear(self.dim, 1, bias=False)
        self.truth = np.stack([np.ones(self.dim), -np.ones(self.dim)])[:, None, :]

    def client_data(self, client_ids):
        rngs = [np.random.default_rng([self.seed, 100, int(c)]) for c in client_ids]
        x = np.stack([r.standard_normal((20, self.dim)) for r in rngs]).astype(np.float32)
        w = self.truth[np.asarray(client_ids) % 2].transpose(0, 2, 1)
        return ToyCohort(np.asarray(client_ids), x, (x @ w + 0.1 * np.stack([r.standard_normal((20, 1)) for r in rngs])).astype(np.float32))

    def initial_parameters(self) -> Params:
        return get_params(self.model)

    def local_loss(self, params, data):
        return ((data.x @ params["weight"].T - data.y) ** 2).mean(axis=(1, 2))

    def local_train(self, start, data, settings: TrainSettings):
        def train(j, model):
            mse = lambda m, x, y: ((m(x) - y) ** 2).mean()  # noqa: E731
            train_steps(model, mse, minibatches((data.x[j], data.y[j]), full_batch()), steps=settings.local_steps,
                        optimizer=lambda p: torch.optim.SGD(p, lr=settings.lr), proximal_mu=settings.proximal_mu)
        out = train_clients(self.model, start, train)
        out["weight"][data.client_ids == self.outlier] = 100.0
        return out

    def subset(self, data, index):
        return ToyCohort(data.client_ids[index], data.x[index], data.y[index])

    def central_metrics(self, models, confusion=None):
        distances = np.linalg.norm(models["weight"][None] - self.truth[:, None], axis=(2, 3))  # (truth, model)
        return {"model_error": float(distances.min(axis=1).max())}
# ---- end of the workload ------------------------------------------------------------------------


def toy_table(strategies, outlier=-1, rounds=8):
    return {
        "run": {"name": "toy", "workload": TOY, "rounds": rounds, "strategies": strategies, "monitor": ""},
        "federation": {"clients": 12, "cohort_size": 4, "seed": 0},
        "anchors": {"count": 4},
        "clustered": {"phase1": "anchor-models", "anchor_steps": 20},
        "train": {"local_steps": 5, "lr": 0.1, "proximal_mu": 1.0},
        "toy": {"outlier": outlier},
    }


def toy_scenario(strategies, outlier=-1, rounds=8):
    return resolve(toy_table(strategies, outlier, rounds))


def final_models(rows):
    return rows[-1]["models"]["weight"]


@pytest.mark.slow
def test_a_toy_workload_defined_in_a_test_runs_under_fedavg_and_the_clustered_strategy_through_flower(
        ray_cluster, tmp_path):
    """As a user runs their own workload: a scenario file naming it by import path, `umbel run`."""
    import subprocess
    import sys
    from pathlib import Path

    import tomli_w

    from server.record import load_history
    from simulations.scenarios import load_scenario

    path = tmp_path / "toy.toml"
    path.write_text(tomli_w.dumps(toy_table(["fedavg", "clustered-fedavg"])))
    umbel = str(Path(sys.executable).parent / "umbel")
    proc = subprocess.run([umbel, "run", str(path), "--out", str(tmp_path / "runs"), "--ray-address", ray_cluster],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    flower = load_history(run_dir)["strategies"]
    ref = Reference(load_scenario(str(path)))
    for arm in ("fedavg", "clustered-fedavg"):
        rows = ref.run(arm)
        assert [r["model_error"] for r in flower[arm]] == [r["model_error"] for r in rows]
        assert [r["loss"] for r in flower[arm]] == [r["loss"] for r in rows]
        assert np.array_equal(np.load(run_dir / "models" / f"{arm}.npz")["weight"], final_models(rows))
    # One model cannot fit both clusters; the clustered strategy finds them from its anchors.
    assert flower["clustered-fedavg"][-1]["model_error"] < 0.2 < 1.0 < flower["fedavg"][-1]["model_error"]
    assert "ari" not in flower["clustered-fedavg"][-1]  # the toy declares no true clusters


ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedavg-clip")


def test_the_reference_runs_the_robust_aggregators_through_their_real_classes():
    """With client 11 replying 100 everywhere, FedAvg is dragged far off (a model error of
    22 here) while each robust aggregator gives its own, different model that one outlier
    among 12 cannot drag: within the two clusters' own spread (|w_0 - w_1| = 3.5)."""
    ref = Reference(toy_scenario(["fedavg", *ROBUST], outlier=11, rounds=3))
    fedavg = final_models(ref.run("fedavg"))
    errors = {}
    for name in ROBUST:
        rows = ref.run(name)
        assert not np.array_equal(final_models(rows), fedavg), name
        errors[name] = rows[-1]["model_error"]
        if name in ("krum", "multikrum"):
            assert 11 in rows[1]["flagged"]["krum"]
    assert max(errors.values()) < 3.5 < 10 < ref.run("fedavg")[-1]["model_error"]


@pytest.mark.slow
def test_krum_through_flower_equals_the_reference(ray_cluster, tmp_path):
    from server.record import load_history
    from simulations.launcher import simulate

    scenario = toy_scenario(["krum"], outlier=11, rounds=3)
    run_dir = simulate(scenario, out=tmp_path, ray_address=ray_cluster)
    rows = Reference(scenario).run("krum")
    assert np.array_equal(np.load(run_dir / "models" / "krum.npz")["weight"], final_models(rows))
    assert [r.get("flagged") for r in load_history(run_dir)["strategies"]["krum"]] == [r.get("flagged") for r in rows]


class FrozenVariant(ToyRegression):
    """The toy with two arms: "frozen" leaves every model as it came (no local training)."""

    def variants(self):
        return ("plain", "frozen")

    def local_train(self, start, data, settings: TrainSettings):
        if settings.variant == "frozen":
            return {name: np.array(v) for name, v in start.items()}
        return super().local_train(start, data, settings)


@pytest.mark.parametrize("strategy", ["fedavg", "ifca", "clustered-fedavg"])
def test_local_training_learns_its_arm_under_one_and_k_model_strategies(strategy):
    """``settings.variant`` carries the arm to local training under every strategy: the
    frozen arm's models never move after round 1, the plain arm's do."""
    def final(variant, rounds):
        table = toy_table([strategy], rounds=rounds)
        table["run"]["workload"] = "tests.test_new_workload:FrozenVariant"
        return final_models(Reference(resolve(table)).run(strategy, variant=variant))

    assert np.array_equal(final("frozen", 3), final("frozen", 1))
    assert not np.array_equal(final("plain", 3), final("plain", 1))
