"""Blind image quality by progressive multi-task learning: PMT-IQA, federated.

PMT-IQA (Pan et al., arXiv 2301.01182) predicts a quality score from a distorted image alone
with multi-scale features (MS), a shared trunk, a score head and a coarse quality-level
head, and moves its loss from the easy classification to the hard regression over training
(``model``; ``shared/specs/iqa-pmt.md``). Here at CPU scale, on an offline set (``data``):
crops of the bundled photos, distortions at five levels, a full-reference proxy score, one
fixed cross-validation fold of source images held out as the server's test set.

Each client holds training patches of mostly one distortion *family* (client c is of
family c mod families: the hidden groups of ``clustered-fedavg`` with ``anchor-models``
and IFCA; ARI in the record). Every round each client trains ``train.local_steps`` Adam
steps on its patches (random flips and transposes) from the model it received, with its
arm's loss (``model.ARMS``). PMT's progress follows the **global round**, (r - 1) / (R - 1)
of R = ``run.rounds``, not a local epoch, so every round does not restart easy to hard.

Which features an arm uses travels with the model (the ``use_ms`` entry, set by the
clients of the single-task arm to 0 and averaged like any weight), so the server evaluates
any model without knowing its arm.

Server side (``central_metrics``): SRCC and PLCC of the predicted against the proxy scores
on the held-out fold (``srcc``, ``plcc``), per distortion (``srcc_<distortion>``) and per
family (``srcc_family<g>``; a k-model strategy: a family's patches pick the model of least
L1 on its first ``pick_images``, as a new client of that family would), and the reference
line ``srcc_level_scorer``: the mean training score of each (distortion, level), a scorer
told what a blind model must infer.

``baselines``: ``centralised``, one client holding every client's patches (``pool_clients``),
trained for as many steps as the whole federation takes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import Any, Iterator

import numpy as np
import torch

from workloads import streams, torch_train
from workloads.base import (
    ConfigField, DeviceFiles, KnownClusters, Params, TrainSettings, Workload, non_negative, pooled_baselines,
    positive, some_of,
)
from workloads.device_files import offsets, rows_of
from workloads.pmt_iqa import device
from workloads.pmt_iqa.data import (
    DISTORTIONS, FAIR_DISTORTIONS, FAMILIES, FAMILY_OF, FOLDS, PROXIES, IQASettings, build_set, level_scorer,
    quality_level, split_clients,
)
from workloads.pmt_iqa.model import ARMS, IQANet, arm_loss, multi_scale
from workloads.quality_metrics import plcc, srcc

BASELINES = ("centralised",)
USE_MS = "use_ms"  # 1: multi-scale features, 0: the last stage's (single-task)
SCATTER_POINTS = 600

_arms = some_of(ARMS, "arm", "an")
_distortions = some_of(DISTORTIONS, "distortion")


def _widths(v: list) -> str | None:
    if len(v) != 4 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in v):
        return "must be four positive integers (channels of the four stages)"
    return None


def _share(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must lie in [0, 1]"


@dataclass(frozen=True, kw_only=True)
class PatchCohort:
    """A cohort's patches: client j's are rows ``starts[j]:starts[j + 1]``."""

    client_ids: np.ndarray  # (B,) int64
    patches: np.ndarray  # (N, 1, s, s) float32 in [0, 1]
    scores: np.ndarray  # (N,) float32 in [0, 100]
    starts: np.ndarray  # (B + 1,)
    groups: np.ndarray | None = None  # (B,) the client's distortion family; None on a device

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)


def _dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """One of 8 flips/transposes (a patch side a multiple of 8 keeps JPEG's block grid)."""
    if code & 1:
        x = x.flip(-1)
    if code & 2:
        x = x.flip(-2)
    if code & 4:
        x = x.transpose(-1, -2)
    return x


class PMTIQA(Workload, KnownClusters, DeviceFiles):
    name = "pmt_iqa"
    section = "iqa"
    key_metric = "srcc"
    higher_is_better = True
    summary_metrics = ("plcc", "mae")  # srcc_<distortion>, srcc_family<g> and the scorer: the report adds srcc_*
    plot_metrics = ("plcc",)
    reference_lines = {"srcc": ("srcc_level_scorer", "per-level scorer (told distortion and level)")}
    schema = {
        "arms": ConfigField(list, list(ARMS), "arms compared: " + ", ".join(ARMS), _arms),
        "distortions": ConfigField(list, list(FAIR_DISTORTIONS), "distortion types (data module; the spec's "
                                   "six include blur and contrast)", _distortions),
        "proxy": ConfigField(str, "psnr", "full-reference proxy score", choices=PROXIES),
        "continuous_levels": ConfigField(bool, True, "strength drawn within each level's band (else the level's "
                                         "value)"),
        "patch_size": ConfigField(int, 32, "patch side in pixels (a multiple of 8)", positive),
        "crops_per_source": ConfigField(int, 32, "reference crops per bundled photo", positive),
        "rater_noise": ConfigField(float, 2.0, "sd of the noise added to the proxy score", non_negative),
        "data_seed": ConfigField(int, 0, "seed of the crops and distortions (not the federation's)",
                                 non_negative),
        "fold": ConfigField(int, 0, f"held-out fold of source images (0..{FOLDS - 1})",
                            choices=tuple(range(FOLDS))),
        "family_share": ConfigField(float, 0.8, "share of a client's patches from its own family", _share),
        "widths": ConfigField(list, [16, 32, 64, 128], "channels of the CNN's four stages", _widths),
        "ms_dim": ConfigField(int, 16, "width of each stage's multi-scale vector", positive),
        "hidden": ConfigField(int, 16, "width of the trunk's last layer", positive),
        "batch_size": ConfigField(int, 32, "local minibatch size", positive),
        "pick_images": ConfigField(int, 32, "test patches of a family that pick its model (k-model strategies)",
                                   positive),
        "pool_clients": ConfigField(int, 0, "> 0: client 0 holds the patches of clients 0..pool_clients-1 "
                                    "(the centralised baseline)", non_negative),
        "baselines": ConfigField(list, ["centralised"], "reference runs after the federation (in-process): "
                                 + ", ".join(BASELINES), some_of(BASELINES, "baseline", empty_ok=True)),
    }

    # ---- scenario -------------------------------------------------------------------------

    @classmethod
    def families_of(cls, distortions: list[str]) -> list[int]:
        """The families present among ``distortions`` (sorted): the hidden groups."""
        return sorted({int(FAMILY_OF[DISTORTIONS.index(d)]) for d in distortions})

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        c, fed = scenario[cls.section], scenario["federation"]
        problems = torch_train.check_device(scenario)
        if c["patch_size"] % 8 or c["patch_size"] < 16:
            problems.append(("iqa.patch_size", f"{c['patch_size']} is not a multiple of 8 of at least 16 "
                             "(JPEG's 8x8 blocks; four stages halve it three times)"))
        if c["pool_clients"] and fed["clients"] != 1:
            problems.append(("iqa.pool_clients", f"pools the patches into one client, but federation.clients is "
                             f"{fed['clients']}"))
        families = len(cls.families_of(c["distortions"]))
        if not c["pool_clients"] and fed["clients"] < families:
            problems.append(("federation.clients", f"{fed['clients']} clients cannot hold the {families} "
                             "distortion families of iqa.distortions"))
        if scenario["run"]["rounds"] < 2 and "pmt" in c["arms"]:
            problems.append(("run.rounds", "pmt moves from classification to regression over the rounds: "
                             "it needs at least 2"))
        return problems

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        anchors = scenario["anchors"]["count"]
        families = len(cls.families_of(scenario[cls.section]["distortions"]))
        if anchors < families:
            return [("anchors.count", f"{anchors} anchors cannot cover {families} distortion families: Phase 1 "
                     "needs one per family (anchors are clients 0..count-1, client c is of family c mod families)")]
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """``centralised``: one client with every client's patches, as many steps as the federation."""
        return pooled_baselines(cls.section, scenario)

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread
        super().__init__(scenario)
        self.options = dict(scenario[self.section])
        self.settings = IQASettings.from_options(self.options)
        self.arms = tuple(self.options["arms"])
        self.rounds = int(scenario["run"]["rounds"])
        self.families = self.families_of(self.options["distortions"])
        self._net_args = dict(widths=tuple(int(w) for w in self.options["widths"]),
                              ms_dim=int(self.options["ms_dim"]), hidden=int(self.options["hidden"]))
        self._model = IQANet(**self._net_args)
        self._trainer = torch_train.on_device(self._model, self.torch_device)

    def variants(self) -> tuple[str, ...]:
        return self.arms

    # ---- clusters -------------------------------------------------------------------------

    @property
    def num_clusters(self) -> int:
        return len(self.families)

    def true_clusters(self, data: PatchCohort) -> np.ndarray | None:
        return data.groups

    # ---- data -----------------------------------------------------------------------------

    @cached_property
    def dataset(self):
        return build_set(self.settings)

    @cached_property
    def family_index(self) -> np.ndarray:
        """Per distortion: its hidden group (the index of its family among those present)."""
        return np.array([self.families.index(f) if f in self.families else -1 for f in FAMILY_OF], np.int64)

    def _split(self, clients: int) -> list[np.ndarray]:
        d = self.dataset
        groups = self.family_index[d.distortion]
        return split_clients(groups, d.fold != int(self.options["fold"]), clients, len(self.families),
                             float(self.options["family_share"]), self.seed)

    def client_data(self, client_ids: np.ndarray) -> PatchCohort:
        ids = np.asarray(client_ids, np.int64)
        pool = int(self.options["pool_clients"])
        split = self._split(pool or self.num_clients)
        rows = [np.concatenate(split) if pool else split[int(c)] for c in ids]
        d = self.dataset
        index = np.concatenate(rows)
        groups = None if pool else ids % len(self.families)
        return PatchCohort(client_ids=ids, patches=d.patches[index], scores=d.scores[index],
                           starts=offsets([len(r) for r in rows]), groups=groups)

    def subset(self, data: PatchCohort, index: np.ndarray) -> PatchCohort:
        index = np.asarray(index, np.int64)
        rows = rows_of(data.starts, index)
        return replace(data, client_ids=data.client_ids[index], patches=data.patches[rows],
                       scores=data.scores[rows], starts=offsets(data.num_examples[index]),
                       groups=None if data.groups is None else data.groups[index])

    device_format = device.FORMAT

    def device_files(self, data: PatchCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> PatchCohort:
        return PatchCohort(**device.read_device_files(files, self.num_clients, self.settings.size))

    @cached_property
    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(self.dataset.fold == int(self.options["fold"]))

    @cached_property
    def level_scorer_srcc(self) -> float:
        """SRCC of the per-(distortion, level) mean score of the training folds on the test fold."""
        d = self.dataset
        train = np.flatnonzero(d.fold != int(self.options["fold"]))
        return srcc(level_scorer(d, train, self.test_rows), d.scores[self.test_rows])

    # ---- the model ------------------------------------------------------------------------

    def _draw(self, seed: int, j: int) -> Params:
        with torch.random.fork_rng():
            torch.manual_seed(int(np.random.SeedSequence([seed, streams.IQA_INIT, j]).generate_state(1)[0]))
            net = IQANet(**self._net_args)
        params = torch_train.get_params(net, by="state_dict")
        params[USE_MS] = np.ones(1, np.float32)
        return params

    def initial_parameters(self) -> Params:
        return self._draw(self.seed, 0)

    def random_models(self, k: int, seed: int) -> Params:
        """k independent draws of the network's own initialisation, stacked (IFCA's start)."""
        draws = [self._draw(seed, j) for j in range(k)]
        return {n: np.stack([d[n] for d in draws]) for n in draws[0]}

    def _load(self, params: Params, model: IQANet | None = None) -> tuple[IQANet, bool]:
        model = self._model if model is None else model
        torch_train.set_params(model, {n: v for n, v in params.items() if n != USE_MS}, by="state_dict")
        model.eval()
        return model, bool(np.asarray(params[USE_MS]).ravel()[0] >= 0.5)

    def predict(self, params: Params, patches: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted scores (0..100 units) of a model on patches, with the features it was trained on."""
        net, ms = self._load(params)
        return torch_train.in_chunks(partial(net, multi_scale=ms), torch.as_tensor(patches)).double().numpy()

    def _l1(self, params: Params, data: PatchCohort) -> np.ndarray:
        err = np.abs(self.predict(params, data.patches) - data.scores)
        return np.add.reduceat(err, data.starts[:-1]) if len(err) else np.zeros(len(data.client_ids))

    def local_loss(self, params: Params, data: PatchCohort) -> np.ndarray:
        """Each client's mean absolute error of the score (what a client picks a model by)."""
        return self._l1(params, data) / data.num_examples

    def local_evaluate(self, params: Params, data: PatchCohort) -> dict[str, np.ndarray]:
        return {"loss": self._l1(params, data)}

    # ---- local training -------------------------------------------------------------------

    def progress(self, server_round: int) -> float:
        """PMT's place between classification (0) and regression (1): (r - 1) / (R - 1)."""
        return min(1.0, max(0.0, (server_round - 1) / max(1, self.rounds - 1)))

    def _batches(self, data: PatchCohort, j: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        x = torch.from_numpy(data.patches[lo:hi])
        s = torch.from_numpy(data.scores[lo:hi].astype(np.float32))
        level = torch.from_numpy(quality_level(data.scores[lo:hi]))
        for idx in torch_train.numpy_epochs(len(x), int(self.options["batch_size"]), rng):
            xb = _dihedral(x[idx], int(rng.integers(8)))
            yield xb.to(self.torch_device), s[idx].to(self.torch_device), level[idx].to(self.torch_device)

    def local_train(self, start: Params, data: PatchCohort, settings: TrainSettings) -> Params:
        """``local_steps`` Adam steps per client with its arm's loss (``settings.variant``;
        regression on the multi-scale features in Phase 1's anchor training)."""
        arm = settings.variant or "ms"
        if arm not in ARMS:
            raise ValueError(f"unknown PMT-IQA arm {arm!r}; expected one of {list(ARMS)}")
        progress = self.progress(settings.server_round)
        optimizer = partial(torch.optim.Adam, lr=settings.lr)
        objective = partial(_objective, arm=arm, progress=progress)
        weights = {n: v for n, v in start.items() if n != USE_MS}

        def train(j: int, model: torch.nn.Module) -> None:
            cid = int(data.client_ids[j])
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.IQA_TRAIN, cid,
                                                                settings.server_round]))
            torch_train.train_steps(model, objective, self._batches(data, j, rng), steps=settings.local_steps,
                                    optimizer=optimizer, proximal_mu=settings.proximal_mu)

        out = torch_train.train_clients(self._trainer, weights, train, by="state_dict")
        flag = np.float32(1.0 if multi_scale(arm) else 0.0)
        out[USE_MS] = np.full((len(data.client_ids), 1), flag, np.float32)
        return out

    # ---- server side ----------------------------------------------------------------------

    def _pick(self, models: Params, g: int) -> int:
        """The model a new client of family g picks: least L1 on the family's first test patches."""
        k = len(next(iter(models.values())))
        if k == 1:
            return 0
        d, rows = self.dataset, self.test_rows
        mine = rows[self.family_index[d.distortion[rows]] == g][: int(self.options["pick_images"])]
        errs = [np.mean(np.abs(self.predict({n: v[i] for n, v in models.items()}, d.patches[mine]) - d.scores[mine]))
                for i in range(k)]
        return int(np.argmin(errs))

    def test_predictions(self, models: Params) -> np.ndarray:
        """Every test patch's predicted score, each family's by the model it picks."""
        d, rows = self.dataset, self.test_rows
        fam = self.family_index[d.distortion[rows]]
        pred = np.zeros(len(rows))
        for g in range(len(self.families)):
            at = fam == g
            if at.any():
                i = self._pick(models, g)
                pred[at] = self.predict({n: v[i] for n, v in models.items()}, d.patches[rows[at]])
        return pred

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        if confusion is not None:  # the clients' choices: ARI comes from the platform
            return {}
        d, rows = self.dataset, self.test_rows
        pred, truth = self.test_predictions(models), d.scores[rows].astype(np.float64)
        out = {"srcc": srcc(pred, truth), "plcc": plcc(pred, truth), "srcc_level_scorer": self.level_scorer_srcc}
        for t, kind in enumerate(DISTORTIONS):
            at = d.distortion[rows] == t
            if at.any():
                out[f"srcc_{kind}"] = srcc(pred[at], truth[at])
        fam = self.family_index[d.distortion[rows]]
        for g, f in enumerate(self.families):
            out[f"srcc_family{g}"] = srcc(pred[fam == g], truth[fam == g])
        out["mae"] = float(np.mean(np.abs(pred - truth)))
        return out

    def final_report(self, models: Params) -> dict[str, Any]:
        """Test patches' predicted against proxy scores, by distortion (a scatter; at most
        ``SCATTER_POINTS`` of them, evenly spaced, to keep the run record small)."""
        d, rows = self.dataset, self.test_rows
        pred = self.test_predictions(models)
        show = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), SCATTER_POINTS)).astype(np.int64))
        return {"quality_scatter": {"predicted": np.round(pred[show], 2).tolist(),
                                    "proxy": np.round(d.scores[rows[show]], 2).tolist(),
                                    "distortion": [DISTORTIONS[t] for t in d.distortion[rows[show]]],
                                    "family_names": [FAMILIES[f] for f in self.families]}}


def _objective(model: IQANet, x: torch.Tensor, score: torch.Tensor, level: torch.Tensor, *, arm: str,
               progress: float) -> torch.Tensor:
    return arm_loss(model, x, score, level, arm, progress)
