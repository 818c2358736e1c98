"""Koopman neural operators on viscous Burgers, with clients clustered by physics.

Each client holds Burgers trajectories of its own viscosity (one of G groups) on its own
grid (e.g. 128, 256 or 512 points) and trains a KNO (``model.KNO``; plain torch) to map the
field at t = 0 to the field at the horizon T (``steps = 1``), or one step of T / steps
(``steps > 1``, rolled out ``steps`` times to reach T). KNO's weights do not depend on the
grid, so clients on different grids share one model. The initial condition does not reveal
the viscosity: one model for all groups cannot beat the ν-blind floor, which is why the
viscosity groups are clusters (k = G) for the k-model strategies. The further baseline gives
the model ν as a constant input channel (``viscosity_channel``).

Server-side metrics: each group's held-out trajectories (``test_per_viscosity``, on
``eval_grid``) act as a new client of that group: they pick the model with the least loss,
as clients do, and its relative L2 error at T is ``rel_l2_nu=<ν>``; ``rel_l2`` is the mean
over groups. ``final_report`` adds the rollout error over time (the model applied on past T)
and one predicted field per group against the solver's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from workloads import streams, torch_train
from workloads.base import ConfigField, KnownClusters, Params, TrainSettings, Workload, non_negative, positive
from workloads.base import DeviceFiles
from workloads.koopman import device
from workloads.koopman.data import STREAM_TRAIN_DATA, subsample, test_set, trajectories
from workloads.koopman.model import MODELS, build, objective, relative_l2

STREAM_TRAIN = streams.KOOPMAN_TRAIN
STREAM_MODEL_INIT = streams.KOOPMAN_INIT


def _positive_list(v: list) -> str | None:
    if not v:
        return "must not be empty"
    if any(not isinstance(x, (int, float)) or isinstance(x, bool) or x <= 0 for x in v):
        return "every entry must be a number > 0"
    return "has repeated entries" if len(set(v)) != len(v) else None


BASELINES = ("centralised-same-steps", "centralised-same-epochs", "fedavg-nu-channel")


def _baseline_list(v: list) -> str | None:
    unknown = [b for b in v if b not in BASELINES]
    return f"unknown baseline {unknown[0]!r}; expected some of {list(BASELINES)}" if unknown else None


def viscosity_feature(nu: float) -> float:
    """The ν input channel: log10(ν) + 2, of order one for ν in [0.001, 0.1]."""
    return float(np.log10(nu) + 2)


@dataclass(frozen=True)
class BurgersCohort:
    """A cohort's trajectories: client j holds ``counts[j]`` trajectories of
    ``snapshots`` fields on ``grids[j]`` points, flattened into ``fields`` from ``starts[j]``."""

    client_ids: np.ndarray  # (B,) int64
    labels: np.ndarray | None  # (B,) viscosity group (the true cluster); None: unknown (a device's files)
    viscosity: np.ndarray  # (B,) float64; NaN where unknown (a device without the ν channel)
    grids: np.ndarray  # (B,) int64
    counts: np.ndarray  # (B,) int64
    starts: np.ndarray  # (B + 1,) int64
    fields: np.ndarray  # flat float32
    snapshots: int

    @property
    def num_examples(self) -> np.ndarray:
        return self.counts

    def client(self, j: int) -> np.ndarray:
        """(counts[j], snapshots, grids[j]) float32 trajectories of client j."""
        shape = (int(self.counts[j]), int(self.snapshots), int(self.grids[j]))
        return np.asarray(self.fields[self.starts[j]:self.starts[j + 1]]).reshape(shape)


def _pack(ids: np.ndarray, labels: np.ndarray | None, viscosity: np.ndarray, grids: np.ndarray,
          counts: np.ndarray, parts: list[np.ndarray], snapshots: int) -> BurgersCohort:
    """A cohort from each client's flattened fields (concatenated, with offsets)."""
    starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    fields = np.concatenate(parts) if parts else np.empty(0, np.float32)
    return BurgersCohort(client_ids=ids, labels=labels, viscosity=viscosity, grids=grids, counts=counts,
                         starts=starts, fields=fields, snapshots=snapshots)


def _step_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean relative L2 error of one model step over the pairs (x, y): the local loss."""
    with torch.no_grad():
        return relative_l2(model(x), y).double().mean().item()


class KoopmanBurgers(Workload, KnownClusters, DeviceFiles):
    name = "koopman_burgers"
    section = "koopman"
    key_metric = "rel_l2"
    loss_name = "train_rel_l2"
    schema = {
        "viscosities": ConfigField(list, [0.005, 0.015, 0.05], "viscosity of each group (the clusters)", _positive_list),
        "grids": ConfigField(list, [128, 256, 512], "grid points of the clients, in turn within each group", _positive_list),
        "train_per_client": ConfigField(int, 64, "trajectories held by each client", positive),
        "test_per_viscosity": ConfigField(int, 64, "held-out trajectories per group (server metrics)", positive),
        "eval_grid": ConfigField(int, 256, "grid points of the server's test fields", positive),
        "horizon": ConfigField(float, 0.5, "time T the model predicts (from t = 0)", positive),
        "steps": ConfigField(int, 1, "model steps to reach T (> 1: a one-step model rolled out)", positive),
        "rollout_horizons": ConfigField(int, 3, "the rollout figure runs the model to this many x T", positive),
        "solver_points": ConfigField(int, 512, "grid of the pseudo-spectral solve (every grid divides it)", positive),
        "solver_dt": ConfigField(float, 5e-4, "solver time step (RK4, CFL-limited)", positive),
        "model": ConfigField(str, "kno", "KNO or the AFNO-mixer variant of the family", choices=MODELS),
        "width": ConfigField(int, 32, "observables o of the encoder", positive),
        "modes": ConfigField(int, 16, "Fourier modes m kept by the Koopman operator", positive),
        "power": ConfigField(int, 6, "applications r of the Koopman operator", positive),
        "batch_size": ConfigField(int, 32, "local minibatch size", positive),
        "weight_decay": ConfigField(float, 1e-4, "Adam weight decay", non_negative),
        "viscosity_channel": ConfigField(bool, False, "give the model ν as an input channel"),
        "baselines": ConfigField(list, ["centralised-same-steps", "fedavg-nu-channel"],
                                 "reference runs after the federation (in-process): " + ", ".join(BASELINES), _baseline_list),
    }

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        kp, fed = scenario[cls.section], scenario["federation"]
        groups, problems = len(kp["viscosities"]), torch_train.check_device(scenario)
        if fed["clients"] % groups:
            problems.append(("federation.clients", f"{fed['clients']} clients do not split evenly into "
                             f"{groups} viscosity groups"))
        for g in list(kp["grids"]) + [kp["eval_grid"]]:
            if not isinstance(g, int) or kp["solver_points"] % g:
                problems.append(("koopman.grids", f"grid {g} does not divide solver_points ({kp['solver_points']})"))
            elif kp["modes"] > g // 2:
                problems.append(("koopman.modes", f"{kp['modes']} modes exceed half of the {g}-point grid"))
        kmax = np.pi * kp["solver_points"] * 2 / 3
        if kp["solver_dt"] * kmax * 3.0 > 2.8:  # RK4 on advection, |u| <= 3 for this prior
            problems.append(("koopman.solver_dt", f"{kp['solver_dt']} breaks the CFL limit of "
                             f"{2.8 / (3.0 * kmax):.2g} at {kp['solver_points']} points"))
        return problems

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        anchors, groups = scenario["anchors"]["count"], len(scenario[cls.section]["viscosities"])
        if anchors < groups:
            return [("anchors.count", f"{anchors} anchors cannot cover {groups} viscosity groups: Phase 1 "
                     "needs at least one per group (anchors are ids 0..count-1)")]
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """One model per viscosity on its group's pooled trajectories (one client per group at
        ``eval_grid``, the oracle strategy, the same optimiser and step-size schedule), taking
        either the steps one client takes per round (``centralised-same-steps``) or as many
        epochs as the federation (``centralised-same-epochs``: clients-per-group times the
        steps); and FedAvg with ν as an input channel (``fedavg-nu-channel``)."""
        kp, fed, train = scenario[cls.section], scenario["federation"], scenario["train"]
        if kp["viscosity_channel"]:
            return {}
        groups = len(kp["viscosities"])
        slots = fed["clients"] // groups

        def pooled(steps: int) -> dict[str, dict[str, Any]]:
            return {
                "run": {"strategies": ["oracle"]},
                "federation": {"clients": groups, "cohort_size": groups, "participation": 1.0, "dropout": 0.0},
                "koopman": {"train_per_client": kp["train_per_client"] * slots, "grids": [kp["eval_grid"]]},
                "train": {"local_steps": steps},
            }

        runs = {
            "centralised-same-steps": pooled(train["local_steps"]),
            "centralised-same-epochs": pooled(train["local_steps"] * slots),
            "fedavg-nu-channel": {"run": {"strategies": ["fedavg"]}, "koopman": {"viscosity_channel": True}},
        }
        return {name: runs[name] for name in kp["baselines"]}

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread (small models)
        super().__init__(scenario)
        kp = scenario[self.section]
        self.options = dict(kp)
        self.viscosities = tuple(float(v) for v in kp["viscosities"])
        steps = int(kp["steps"])
        self.times = np.linspace(0.0, float(kp["horizon"]), steps + 1)
        self._model = self._new_model()
        self._names = list(self._model.state_dict())
        self._trainer = torch_train.on_device(self._model, self.torch_device)
        self._tests: list[np.ndarray] | None = None  # the server's test fields, made on first use

    def _new_model(self) -> torch.nn.Module:
        kp = self.options
        return build(kp["model"], 2 if kp["viscosity_channel"] else 1, int(kp["width"]),
                     int(kp["modes"]), int(kp["power"]))

    @property
    def num_clusters(self) -> int:
        return len(self.viscosities)

    def true_clusters(self, data: BurgersCohort) -> np.ndarray | None:
        return data.labels

    # ---- data ----------------------------------------------------------------------------

    def layout(self, client_id: int) -> tuple[int, np.ndarray, int]:
        """(group, trajectory indices, grid points) of a client."""
        groups, n = len(self.viscosities), int(self.options["train_per_client"])
        group, slot = client_id % groups, client_id // groups
        grids = self.options["grids"]
        return group, np.arange(slot * n, (slot + 1) * n), int(grids[slot % len(grids)])

    def client_data(self, client_ids: np.ndarray) -> BurgersCohort:
        ids = np.asarray(client_ids, dtype=np.int64)
        labels, grids, parts = [], [], []
        for c in ids:
            group, index, grid = self.layout(int(c))
            fields = trajectories(self.seed, STREAM_TRAIN_DATA, group, self.viscosities[group], index,
                                  self.times, int(self.options["solver_points"]), float(self.options["solver_dt"]))
            labels.append(group)
            grids.append(grid)
            parts.append(subsample(fields, grid).astype(np.float32).ravel())
        counts = np.full(len(ids), int(self.options["train_per_client"]), np.int64)
        return _pack(ids, np.array(labels, np.int64), np.array([self.viscosities[g] for g in labels]),
                     np.array(grids, np.int64), counts, parts, len(self.times))

    def subset(self, data: BurgersCohort, index: np.ndarray) -> BurgersCohort:
        parts = [np.asarray(data.fields[data.starts[j]:data.starts[j + 1]]) for j in index]
        labels = None if data.labels is None else data.labels[index]
        return _pack(data.client_ids[index], labels, data.viscosity[index],
                     data.grids[index], data.counts[index], parts, int(data.snapshots))

    device_format = device.FORMAT

    def device_files(self, data: BurgersCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data, bool(self.options["viscosity_channel"]))

    def read_device_files(self, files: list[Any]) -> BurgersCohort:
        return _pack(**device.read_device_files(
            files, self.num_clients, len(self.times), int(self.options["modes"]), len(self.viscosities),
            bool(self.options["viscosity_channel"])))

    def _inputs(self, fields: np.ndarray | torch.Tensor, nu: float) -> torch.Tensor:
        """(..., points) fields -> model inputs (..., points, channels)."""
        u = torch.as_tensor(fields, dtype=torch.float32)[..., None]
        if not self.options["viscosity_channel"]:
            return u
        return torch.cat([u, torch.full_like(u, viscosity_feature(nu))], dim=-1)

    def pairs(self, trajectories_: np.ndarray, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pairs (field at t, field one model step later), every consecutive pair."""
        fields = torch.tensor(np.asarray(trajectories_), dtype=torch.float32)  # a copy: data may be read-only maps
        x = fields[:, :-1].reshape(-1, fields.shape[-1])
        y = fields[:, 1:].reshape(-1, fields.shape[-1])
        return self._inputs(x, nu), y[..., None]

    # ---- model ---------------------------------------------------------------------------

    def _load(self, params: Params) -> torch.nn.Module:
        torch_train.set_params(self._model, params, by="state_dict")
        self._model.eval()
        return self._model

    def initial_parameters(self) -> Params:
        return {n: v[0] for n, v in self.random_models(1, self.seed).items()}

    def random_models(self, k: int, seed: int) -> Params:
        """k independent draws of the model's own initialisation, stacked (IFCA's start)."""
        draws = []
        for j in range(k):
            torch.manual_seed(int(np.random.SeedSequence([seed, STREAM_MODEL_INIT, j]).generate_state(1)[0]))
            model = self._new_model()
            draws.append(torch_train.get_params(model, by="state_dict"))
        return {n: np.stack([d[n] for d in draws]) for n in self._names}

    def local_loss(self, params: Params, data: BurgersCohort) -> np.ndarray:
        """Each client's mean relative L2 error of one model step on its trajectories."""
        model = self._load(params)
        return np.array([_step_loss(model, *self.pairs(data.client(j), float(data.viscosity[j])))
                         for j in range(len(data.client_ids))])

    def local_train(self, start: Params, data: BurgersCohort, settings: TrainSettings) -> Params:
        """``local_steps`` Adam steps per client on ``objective``, in epochs of batches shuffled
        by a generator seeded by (seed, client, round)."""
        optimizer = partial(torch.optim.Adam, lr=settings.lr, weight_decay=float(self.options["weight_decay"]))

        def train(j: int, model: torch.nn.Module) -> None:
            x, y = self.pairs(data.client(j), float(data.viscosity[j]))
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.seed, STREAM_TRAIN, int(data.client_ids[j]), settings.server_round]).generate_state(1)[0]))
            order = torch_train.torch_epochs(len(x), int(self.options["batch_size"]), generator)
            batches = torch_train.minibatches((x, y), order, self.torch_device)
            torch_train.train_steps(model, objective, batches, steps=settings.local_steps, optimizer=optimizer,
                                    proximal_mu=settings.proximal_mu)

        return torch_train.train_clients(self._trainer, start, train, by="state_dict")

    # ---- server-side metrics -------------------------------------------------------------

    def test_trajectories(self) -> list[np.ndarray]:
        """Each group's held-out trajectories on ``eval_grid``, to ``rollout_horizons`` x T:
        solved once (the round metrics use the part up to T, the rollout figure all of it)."""
        if self._tests is None:
            kp = self.options
            horizons, steps = int(kp["rollout_horizons"]), int(kp["steps"])
            times = tuple(np.linspace(0.0, float(kp["horizon"]) * horizons, steps * horizons + 1))
            full = test_set(self.seed, self.viscosities, int(kp["test_per_viscosity"]), times,
                            int(kp["solver_points"]), float(kp["solver_dt"]))
            self._tests = [subsample(f, int(kp["eval_grid"])).astype(np.float32) for f in full]
        return self._tests

    def rollout(self, params: Params, u0: np.ndarray, nu: float, steps: int) -> torch.Tensor:
        """(steps, n, points): the model applied ``steps`` times from ``u0`` (n, points)."""
        model = self._load(params)
        u, out = torch.as_tensor(u0, dtype=torch.float32), []
        with torch.no_grad():
            for _ in range(steps):
                u = model(self._inputs(u, nu))[..., 0]
                out.append(u)
        return torch.stack(out)

    def _pick(self, models: Params, group: int, fields: np.ndarray) -> int:
        """The model a new client of the group would pick: the least one-step loss."""
        k = len(next(iter(models.values())))
        if k == 1:
            return 0
        nu = self.viscosities[group]
        steps = int(self.options["steps"])
        x, y = self.pairs(fields[:, :steps + 1], nu)
        return int(np.argmin([_step_loss(self._load({n: v[j] for n, v in models.items()}), x, y)
                              for j in range(k)]))

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        steps, out = int(self.options["steps"]), {}
        for g, fields in enumerate(self.test_trajectories()):
            j = self._pick(models, g, fields)
            pred = self.rollout({n: v[j] for n, v in models.items()}, fields[:, 0], self.viscosities[g], steps)[-1]
            out[f"rel_l2_nu={self.viscosities[g]:g}"] = float(
                relative_l2(pred, torch.from_numpy(fields[:, steps])).double().mean())
        out["rel_l2"] = float(np.mean(list(out.values())))
        return out

    def final_report(self, models: Params) -> dict[str, Any]:
        """Rollout error over time past T, and one predicted field per group at T."""
        steps, horizons = int(self.options["steps"]), int(self.options["rollout_horizons"])
        tests = self.test_trajectories()
        t = np.linspace(0.0, float(self.options["horizon"]) * horizons, steps * horizons + 1)[1:]
        rollout, fields = {"t": t.tolist()}, {}
        for g, traj in enumerate(tests):
            nu = self.viscosities[g]
            j = self._pick(models, g, traj)
            pred = self.rollout({n: v[j] for n, v in models.items()}, traj[:, 0], nu, steps * horizons)
            truth = torch.from_numpy(traj[:, 1:]).transpose(0, 1)
            rollout[f"nu={nu:g}"] = [float(relative_l2(pred[s], truth[s]).mean()) for s in range(len(t))]
            fields[f"nu={nu:g}"] = {"u0": traj[0, 0].tolist(), "truth": traj[0, steps].tolist(),
                                    "prediction": pred[steps - 1, 0].tolist(), "model": j}
        return {"rollout": rollout, "fields": fields}
