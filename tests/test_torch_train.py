"""The shared torch training helper: FedProx term, per-client loop, parameter conversion, device."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.run_config import ScenarioError, client_view
from simulations.scenarios import load_scenario
from workloads import torch_train as tt

torch.set_num_threads(1)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(3))  # a buffer: in state_dict, not in parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))) * self.scale


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def data(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.standard_normal((n, 4)), dtype=torch.float32), torch.as_tensor(rng.integers(0, 3, n))


def fresh(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mu: float = 0.0, seed: int = 0,
          steps: int = 30) -> nn.Module:
    order = tt.numpy_epochs(len(x), 8, np.random.default_rng(seed))
    return tt.train_steps(model, cross_entropy, tt.minibatches((x, y), order), steps=steps,
                          optimizer=partial(torch.optim.Adam, lr=0.05), proximal_mu=mu)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)))


def test_fedprox_pulls_toward_the_start():
    x, y = data(0)
    start = tt.get_params(fresh())
    free = tt.get_params(train(fresh(), x, y, mu=0.0))
    held = tt.get_params(train(fresh(), x, y, mu=10.0))
    assert distance(held, start) < 0.5 * distance(free, start)
    # mu = 0 adds nothing: the same as the loop without the term
    again = tt.get_params(train(fresh(), x, y, mu=0.0))
    assert all(np.array_equal(free[n], again[n]) for n in free)


def test_proximal_term_is_half_mu_squared_distance():
    model = fresh()
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    count = sum(p.numel() for p in model.parameters())
    assert tt.proximal_term(model, anchor, 2.0).detach().item() == pytest.approx(0.5 * 2.0 * count * 0.01, rel=1e-5)


def test_each_client_of_a_cohort_equals_training_it_alone():
    shards = [data(seed, n) for seed, n in ((1, 40), (2, 17), (3, 5))]
    starts = [tt.get_params(fresh(seed)) for seed in range(3)]
    stacked = {n: np.stack([s[n] for s in starts]) for n in starts[0]}

    def step(j: int, model: nn.Module, offset: int = 0) -> None:
        train(model, *shards[j + offset], mu=0.1, seed=j + offset, steps=12)

    cohort = tt.train_clients(fresh(99), stacked, step)
    for j in range(3):
        alone = tt.train_clients(fresh(7), {n: v[j:j + 1] for n, v in stacked.items()},
                                 partial(step, offset=j))
        for n in cohort:
            assert cohort[n].dtype == np.float32
            assert np.array_equal(cohort[n][j], alone[n][0]), (j, n)
    # and the clients differ from one another (each got its own start and data)
    assert not np.array_equal(cohort["out.weight"][0], cohort["out.weight"][1])


@pytest.mark.parametrize("by", tt.BY)
def test_parameter_round_trip_is_exact(by):
    rng = np.random.default_rng(0)
    names = tt.get_params(fresh(), by=by)
    params = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in names.items()}
    model = tt.set_params(fresh(1), params, by=by)
    back = tt.get_params(model, by=by)
    assert list(back) == list(params)
    assert all(back[n].dtype == np.float32 and np.array_equal(back[n], params[n]) for n in params)
    assert ("scale" in back) == (by == "state_dict")
    back["out.weight"][0, 0] += 1  # copies, not views of the module
    assert np.array_equal(tt.get_params(model, by=by)["out.weight"], params["out.weight"])
    with pytest.raises(ValueError, match="parameter layout"):
        tt.get_params(fresh(), by="weights")


def test_index_sources():
    batches = list(zip(range(4), tt.numpy_epochs(10, 4, np.random.default_rng(0))))
    sizes = [len(b) for _, b in batches]
    assert sizes == [4, 4, 2, 4]  # an epoch's last batch is shorter, then a new shuffle
    assert sorted(np.concatenate([b for _, b in batches[:3]]).tolist()) == list(range(10))
    first = [b for _, b in zip(range(3), tt.torch_epochs(7, 3, torch.Generator().manual_seed(0)))]
    assert [len(b) for b in first] == [3, 3, 1]
    assert next(tt.full_batch()) is None
    with pytest.raises(ValueError, match="0 examples"):
        next(tt.numpy_epochs(0, 4, np.random.default_rng(0)))


def test_inference_in_chunks_is_the_whole_pass_row_by_row():
    model, (x, _) = fresh(), data(3, n=23)
    with torch.no_grad():
        whole = model(x)
    for rows in (1, 5, 23, 64):
        chunked = tt.in_chunks(model, x, rows=rows)
        assert chunked.shape == whole.shape and not chunked.requires_grad
        assert torch.allclose(chunked, whole, atol=1e-6)
    assert tt.in_chunks(model, x[:0]).shape == (0, 3)


def test_bundled_digits_train_a_conv_net_the_same_bits_in_memory_and_memory_mapped(tmp_path):
    from workloads.digits import digits

    images, targets = digits()
    rows = np.arange(0, 400, 3)  # a client's subset, by fancy indexing as the workloads do
    np.save(tmp_path / "x.npy", images[rows])
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")

    def trained(x: np.ndarray) -> list[np.ndarray]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            loss = F.cross_entropy(net(torch.as_tensor(x)), torch.as_tensor(targets[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().numpy().copy() for p in net.parameters()]

    assert all(np.array_equal(a, b) for a, b in zip(trained(images[rows]), trained(mapped)))


def test_cpu_by_default_with_one_thread():
    assert tt.select_device({"run": {"num_gpus": 0.0}}).type == "cpu"
    assert tt.select_device({"run": {}}).type == "cpu"
    assert torch.get_num_threads() == 1


def test_gpus_without_cuda_are_refused_naming_the_field(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problems = tt.check_device({"run": {"num_gpus": 0.5}})
    assert [f for f, _ in problems] == ["run.num_gpus"]
    with pytest.raises(ValueError, match=r"run\.num_gpus"):
        tt.select_device({"run": {"num_gpus": 1.0}})
    # at scenario validation, for every torch workload
    for name, extra in (("active-learning", []), ("backdoor-doorping", []),
                        ("koopman-burgers", ["koopman.train_per_client=8"])):
        with pytest.raises(ScenarioError) as err:
            load_scenario(name, ["run.num_gpus=1", *extra])
        assert "run.num_gpus" in dict(err.value.problems), (name, err.value)


def test_clients_see_num_gpus():
    scenario = load_scenario("active-learning")
    assert scenario["run"]["num_gpus"] == 0.0
    assert client_view(scenario)["run"]["num_gpus"] == 0.0
    with pytest.raises(ScenarioError, match="num_gpus"):
        load_scenario("active-learning", ["run.num_gpus=-1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_and_returns_cpu_numpy():
    device = tt.select_device({"run": {"num_gpus": 1.0}})
    assert device.type == "cuda"
    start = {n: v[None] for n, v in tt.get_params(fresh()).items()}
    x, y = data(0)

    def step(j: int, model: nn.Module) -> None:
        order = tt.numpy_epochs(len(x), 8, np.random.default_rng(0))
        tt.train_steps(model, cross_entropy, tt.minibatches((x, y), order, device), steps=30,
                       optimizer=partial(torch.optim.Adam, lr=0.05), proximal_mu=0.1)

    on_gpu = tt.train_clients(tt.on_device(fresh(), device), start, step)
    on_cpu = tt.train_clients(fresh(), start, lambda j, m: train(m, x, y, mu=0.1, steps=30))
    for n in on_cpu:
        assert isinstance(on_gpu[n], np.ndarray) and on_gpu[n].dtype == np.float32
        np.testing.assert_allclose(on_gpu[n], on_cpu[n], atol=1e-3)


def test_ray_actors_get_the_scenarios_gpus():
    from simulations.launcher import backend_config

    assert backend_config(None, "/tmp/x")["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert backend_config(None, "/tmp/x", client_gpus=0.25)["client_resources"]["num_gpus"] == 0.25
