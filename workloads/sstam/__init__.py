"""Compressed-video quality by saliency-aware spatio-temporal artifact measurement: SSTAM, federated.

SSTAM (Lin et al., arXiv 2301.01069) measures six perceivable encoding artifacts (blurring,
blocking, ringing, colour bleeding, flickering, floating) where a viewer looks, with a
TimeSformer-style detector for the temporal ones, and combines them into one quality score
(``shared/specs/video-artifacts-sstam.md``). Here, on real video compressed offline by
PyAV (``video``): generated contents, H.264 CRF ladders with deblocking on and off and
MPEG-2 at fixed quantisers, the luma SSIM against the source as the proxy ground truth.
The detectors and the saliency model are ``detectors``; the temporal attention model is
``temporal``; the features of every encode are measured once (``data``, cached on disk).

Each client is a video service: it holds the encodes of its own contents, all from one
codec (client c is of codec c mod 2, H.264 or MPEG-2: the hidden groups of
``clustered-fedavg`` with ``anchor-models`` and IFCA; ARI in the record), computes the
features locally, and the clients federate the quality regressor: a linear model with an L2
penalty (the spec's ridge; ``hidden > 0``: one hidden layer) from the features to the logit
of SSIM. One fold of contents (``sstam.fold``) is held out as the
server's test set: unseen content. The arms (``ARMS``) differ in the features they read:

- ``sstam``: saliency-weighted detectors, the temporal model's flicker and floating;
- ``no-saliency``: the same under equal weights;
- ``classical-temporal``: saliency-weighted, the classical flicker and floating detectors.

Which arm a model belongs to travels with it (the ``arm`` one-hot entry, set by the clients
and averaged like any weight), so the server evaluates any model without knowing its arm.

Server side (``central_metrics``): SRCC of the predicted against the true SSIM on the test
contents, pooled (``srcc``) and within each (content, ladder) (``srcc_within``: the mean),
PLCC, per codec (``srcc_h264``, ``srcc_mpeg2``; a k-model strategy's codec picks the model
of least error on its test encodes). The record's summary also gets the tables of the data
(``data_tables``): each detector's direction with compression per ladder, deblocking off
against on, and the temporal detectors' AUC on the generator's labels, model against
classical; and a figure of one frame with its saliency and artifact maps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from workloads import streams, torch_train
from workloads.base import (
    ConfigField, DeviceFiles, KnownClusters, Params, TrainSettings, Workload, non_negative, pooled_baselines,
    positive, some_of,
)
from workloads.device_files import offsets, rows_of
from workloads.quality_metrics import plcc, srcc
from workloads.sstam import device
from workloads.sstam.data import FEATURES, FIGURE, FOLDS, SSTAMSettings, SSTAMSet, build_set, transform
from workloads.sstam.detectors import DETECTORS, SPATIAL
from workloads.sstam.temporal import HEADS, auc
from workloads.sstam.video import CODECS, LADDERS

ARMS = ("sstam", "no-saliency", "classical-temporal")
# arm -> (saliency weights?, the feature columns it reads)
ARM_FEATURES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "sstam": (True, SPATIAL + ("flicker_model", "floating_model", "activity", "motion")),
    "no-saliency": (False, SPATIAL + ("flicker_model", "floating_model", "activity", "motion")),
    "classical-temporal": (True, SPATIAL + ("flicker", "floating", "activity", "motion")),
}
INPUTS = 9
# standardised features are clipped to +-3 sd of the detector-training set: one blocking value
# of the evaluated set reached 19 sd, and one such row steers a least-squares fit (and SGD's step)
CLIP_SD = 3.0
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
ARM = "arm"  # the one-hot entry that names a model's arm
BASELINES = ("centralised",)
LOGIT_FLOOR = 1e-3
SCATTER_POINTS = 600
_arms = some_of(ARMS, "arm", "an")


def ssim_logit(ssim: np.ndarray) -> np.ndarray:
    """The regressor's target: logit(SSIM), which spreads the crowded top of the SSIM scale."""
    s = np.clip(np.asarray(ssim, np.float64), LOGIT_FLOOR, 1 - LOGIT_FLOOR)
    return np.log(s / (1 - s))


@dataclass(frozen=True, kw_only=True)
class VideoCohort:
    """A cohort's encodes: client j's are rows ``starts[j]:starts[j + 1]``."""

    client_ids: np.ndarray  # (B,) int64
    features: np.ndarray  # (N, 2, F) raw features: [:, 0] saliency-weighted, [:, 1] equal weights
    ssim: np.ndarray  # (N,) the client's own full-reference SSIM of each encode
    starts: np.ndarray  # (B + 1,)
    groups: np.ndarray | None = None  # (B,) the client's codec; None on a device

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)


class QualityModel(nn.Module):
    """Features (standardised) -> logit SSIM: linear (``hidden = 0``, the spec's ridge when
    trained with weight decay) or one tanh hidden layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        layers = [nn.Linear(INPUTS, hidden), nn.Tanh(), nn.Linear(hidden, 1)] if hidden else [nn.Linear(INPUTS, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def split_contents(content: np.ndarray, codec: np.ndarray, train: np.ndarray, clients: int) -> list[np.ndarray]:
    """Each client's rows: client c is of codec c mod 2 and holds that codec's encodes of
    every training content whose rank among the training contents is c // 2 modulo the
    codec's client count (whole contents: a service owns its videos)."""
    names = np.unique(content[train])
    out = []
    for c in range(clients):
        g = c % len(CODECS)
        peers = len(range(g, clients, len(CODECS)))
        mine = names[np.arange(len(names)) % peers == c // len(CODECS)]
        out.append(np.flatnonzero(train & (codec == g) & np.isin(content, mine)))
    return out


class SSTAMVideo(Workload, KnownClusters, DeviceFiles):
    name = "sstam_video"
    section = "sstam"
    key_metric = "srcc"
    higher_is_better = True
    summary_metrics = ("plcc",)  # srcc_within, srcc_<codec>: the report adds every srcc_*
    plot_metrics = ("srcc_within",)
    schema = {
        "arms": ConfigField(list, list(ARMS), "arms compared: " + ", ".join(ARMS), _arms),
        "contents": ConfigField(int, 16, "generated source videos (folds of contents cycle through them)",
                                lambda v: None if v >= 2 * FOLDS else f"must be >= {2 * FOLDS}"),
        "detector_contents": ConfigField(int, 6, "contents of the temporal model's own training set", positive),
        "temporal_steps": ConfigField(int, 300, "Adam steps that train the temporal model", positive),
        "data_seed": ConfigField(int, 0, "seed of the contents (not the federation's)", non_negative),
        "fold": ConfigField(int, 0, f"held-out fold of contents (0..{FOLDS - 1}): content i is in fold i mod {FOLDS}",
                            choices=tuple(range(FOLDS))),
        "hidden": ConfigField(int, 0, "width of the regressor's hidden layer (0: a linear regressor)",
                              non_negative),
        "optimizer": ConfigField(str, "sgd", "local optimiser: sgd or adam (a fresh one per client and round; "
                                 "the same FedAvg gap at 10 local steps, README)",
                                 choices=tuple(OPTIMIZERS)),
        "weight_decay": ConfigField(float, 0.05, "L2 penalty of local training (the optimiser's weight_decay: ridge)",
                                    non_negative),
        "batch_size": ConfigField(int, 16, "local minibatch size", positive),
        "pool_clients": ConfigField(int, 0, "> 0: client 0 holds the encodes of clients 0..pool_clients-1 "
                                    "(the centralised baseline)", non_negative),
        "baselines": ConfigField(list, ["centralised"], "reference runs after the federation (in-process): "
                                 + ", ".join(BASELINES), some_of(BASELINES, "baseline", empty_ok=True)),
    }

    # ---- scenario -------------------------------------------------------------------------

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        c, fed = scenario[cls.section], scenario["federation"]
        problems = torch_train.check_device(scenario)
        if c["pool_clients"] and fed["clients"] != 1:
            problems.append(("sstam.pool_clients", f"pools the encodes into one client, but federation.clients is "
                             f"{fed['clients']}"))
        train_contents = c["contents"] - len(range(c["fold"], c["contents"], FOLDS))
        per_codec = -(-fed["clients"] // len(CODECS))
        if not c["pool_clients"] and fed["clients"] < len(CODECS):
            problems.append(("federation.clients", f"{fed['clients']} clients cannot hold the {len(CODECS)} codecs"))
        elif not c["pool_clients"] and per_codec > train_contents:
            problems.append(("federation.clients", f"{fed['clients']} clients leave some without a content: "
                             f"each codec's {per_codec} clients share {train_contents} training contents"))
        return problems

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        if scenario["anchors"]["count"] < len(CODECS):
            return [("anchors.count", f"{scenario['anchors']['count']} anchors cannot cover the {len(CODECS)} codecs: "
                     "Phase 1 needs one per codec (anchors are clients 0..count-1, client c is of codec c mod 2)")]
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """``centralised``: one client with every client's encodes, as many steps as the federation."""
        return pooled_baselines(cls.section, scenario)

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread
        super().__init__(scenario)
        self.options = dict(scenario[self.section])
        self.settings = SSTAMSettings.from_options(self.options)
        self.arms = tuple(self.options["arms"])
        self._model = QualityModel(int(self.options["hidden"]))
        self._trainer = torch_train.on_device(self._model, self.torch_device)

    def variants(self) -> tuple[str, ...]:
        return self.arms

    # ---- data -----------------------------------------------------------------------------

    @property
    def num_clusters(self) -> int:
        return len(CODECS)

    def true_clusters(self, data: VideoCohort) -> np.ndarray | None:
        return data.groups

    @cached_property
    def dataset(self) -> SSTAMSet:
        return build_set(self.settings)

    def client_data(self, client_ids: np.ndarray) -> VideoCohort:
        ids = np.asarray(client_ids, np.int64)
        d, pool = self.dataset, int(self.options["pool_clients"])
        split = split_contents(d.content, d.codec, d.fold != int(self.options["fold"]), pool or self.num_clients)
        rows = [np.concatenate(split) if pool else split[int(c)] for c in ids]
        index = np.concatenate(rows)
        return VideoCohort(client_ids=ids, features=d.features[index], ssim=d.ssim[index],
                           starts=offsets([len(r) for r in rows]), groups=None if pool else ids % len(CODECS))

    def subset(self, data: VideoCohort, index: np.ndarray) -> VideoCohort:
        index = np.asarray(index, np.int64)
        rows = rows_of(data.starts, index)
        return replace(data, client_ids=data.client_ids[index], features=data.features[rows], ssim=data.ssim[rows],
                       starts=offsets(data.num_examples[index]),
                       groups=None if data.groups is None else data.groups[index])

    device_format = device.FORMAT

    def device_files(self, data: VideoCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> VideoCohort:
        return VideoCohort(**device.read_device_files(files, self.num_clients))

    # ---- features and the model ------------------------------------------------------------

    def inputs(self, raw: np.ndarray, arm: str) -> torch.Tensor:
        """The arm's standardised input columns of raw features (N, 2, F), clipped to +-``CLIP_SD``."""
        saliency, names = ARM_FEATURES[arm]
        d = self.dataset
        x = np.clip((transform(raw[:, 0 if saliency else 1]) - d.feature_mean) / d.feature_sd, -CLIP_SD, CLIP_SD)
        return torch.from_numpy(x[:, [FEATURES.index(n) for n in names]].astype(np.float32))

    def _draw(self, seed: int, j: int) -> Params:
        with torch.random.fork_rng():
            torch.manual_seed(int(np.random.SeedSequence([seed, streams.SSTAM_INIT, j]).generate_state(1)[0]))
            net = QualityModel(int(self.options["hidden"]))
        params = torch_train.get_params(net)
        # the untrained model is marked as the first arm's: round 0 scores every arm's start on
        # those features; from round 1 on, the clients mark the model with their own arm
        params[ARM] = np.eye(len(ARMS), dtype=np.float32)[ARMS.index(self.arms[0])]
        return params

    def initial_parameters(self) -> Params:
        return self._draw(self.seed, 0)

    def random_models(self, k: int, seed: int) -> Params:
        """k independent draws of the regressor's own initialisation, stacked (IFCA's start)."""
        draws = [self._draw(seed, j) for j in range(k)]
        return {n: np.stack([d[n] for d in draws]) for n in draws[0]}

    def predict(self, params: Params, raw: np.ndarray) -> np.ndarray:
        """Predicted logit SSIM of encodes (raw features (N, 2, F)) under one model."""
        arm = ARMS[int(np.argmax(params[ARM]))]
        torch_train.set_params(self._model, {n: v for n, v in params.items() if n != ARM})
        with torch.no_grad():
            return self._model(self.inputs(raw, arm)).double().numpy()

    def _squared(self, params: Params, data: VideoCohort) -> np.ndarray:
        err = (self.predict(params, data.features) - ssim_logit(data.ssim)) ** 2 if len(data.ssim) else np.zeros(0)
        return np.add.reduceat(err, data.starts[:-1]) if len(err) else np.zeros(len(data.client_ids))

    def local_loss(self, params: Params, data: VideoCohort) -> np.ndarray:
        """Each client's mean squared error of logit SSIM (what a client picks a model by)."""
        return self._squared(params, data) / data.num_examples

    def local_evaluate(self, params: Params, data: VideoCohort) -> dict[str, np.ndarray]:
        return {"loss": self._squared(params, data)}

    def _batches(self, data: VideoCohort, j: int, arm: str,
                 rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        x = self.inputs(np.asarray(data.features[lo:hi]), arm)
        y = torch.from_numpy(ssim_logit(data.ssim[lo:hi]).astype(np.float32))
        for idx in torch_train.numpy_epochs(len(x), int(self.options["batch_size"]), rng):
            yield x[idx].to(self.torch_device), y[idx].to(self.torch_device)

    def local_train(self, start: Params, data: VideoCohort, settings: TrainSettings) -> Params:
        """``local_steps`` steps (``sstam.optimizer``) of squared error per client, on its arm's features."""
        arm = settings.variant or self.arms[0]
        if arm not in ARMS:
            raise ValueError(f"unknown SSTAM arm {arm!r}; expected one of {list(ARMS)}")
        optimizer = partial(OPTIMIZERS[self.options["optimizer"]], lr=settings.lr,
                            weight_decay=float(self.options["weight_decay"]))

        def train(j: int, model: torch.nn.Module) -> None:
            cid = int(data.client_ids[j])
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.SSTAM_TRAIN, cid,
                                                                settings.server_round]))
            torch_train.train_steps(model, _squared_error, self._batches(data, j, arm, rng),
                                    steps=settings.local_steps, optimizer=optimizer, proximal_mu=settings.proximal_mu)

        out = torch_train.train_clients(self._trainer, {n: v for n, v in start.items() if n != ARM}, train)
        out[ARM] = np.repeat(np.eye(len(ARMS), dtype=np.float32)[ARMS.index(arm)][None], len(data.client_ids), 0)
        return out

    # ---- server side ----------------------------------------------------------------------

    @cached_property
    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(self.dataset.fold == int(self.options["fold"]))

    def test_predictions(self, models: Params) -> np.ndarray:
        """Every test encode's predicted logit SSIM, each codec's by the model of least squared
        error on that codec's test encodes (as a new service of that codec would pick)."""
        d, rows = self.dataset, self.test_rows
        k = len(next(iter(models.values())))
        one = [{n: v[i] for n, v in models.items()} for i in range(k)]
        pred = np.zeros(len(rows))
        for g in range(len(CODECS)):
            at = d.codec[rows] == g
            if at.any():
                candidates = [self.predict(m, d.features[rows[at]]) for m in one]
                errors = [np.mean((p - ssim_logit(d.ssim[rows[at]])) ** 2) for p in candidates]
                pred[at] = candidates[int(np.argmin(errors))]
        return pred

    @cached_property
    def data_metrics(self) -> dict[str, float]:
        """Constants of the measured set: each detector's direction over all ladders
        (``direction_<detector>``) and the temporal detectors' AUC on the generator's labels."""
        d = self.dataset
        out = {f"direction_{name}": float(np.mean(directions(d, i))) for i, name in enumerate(DETECTORS)}
        for h, head in enumerate(HEADS):
            out[f"auc_{head}_model"] = auc(d.clip_model[:, h], d.clip_labels[:, h])
            out[f"auc_{head}_classical"] = auc(d.clip_classical[:, h], d.clip_labels[:, h])
        return out

    def data_tables(self) -> list[dict[str, Any]]:
        """The detector-direction table (per ladder: mean signed rho with the level, and the
        contents where rho >= 0.9 the right way), deblocking off against on, and the AUC table."""
        d = self.dataset
        ladders = list(LADDERS)
        rows = []
        for i, name in enumerate(DETECTORS):
            row: list[Any] = [name]
            for li in range(len(ladders)):
                rhos = directions(d, i, li)
                row.append(f"{np.mean(rhos):+.2f} ({int(np.sum(rhos >= 0.9))}/{len(rhos)})")
            rows.append(row)
        on, off = (d.ladder == ladders.index("h264")), (d.ladder == ladders.index("h264-nodeblock"))
        blocking = d.features[:, 0, DETECTORS.index("blocking")]
        pairs = int(np.sum(blocking[off] > blocking[on]))  # rows align: same contents, same levels, in order
        auc_rows = [[head, self.data_metrics[f"auc_{head}_model"], self.data_metrics[f"auc_{head}_classical"],
                     int(np.sum(~np.isnan(d.clip_labels[:, h])))] for h, head in enumerate(HEADS)]
        return [{"title": "Detector directions: mean Spearman rho with the compression level (sign: + is the "
                          "right way; sharpness should fall), and the contents with rho >= 0.9",
                 "header": ["detector", *ladders], "rows": rows},
                {"title": f"Deblocking off shows more blocking than on in {pairs} of {int(on.sum())} pairs "
                          "(same content and CRF)", "header": [], "rows": []},
                {"title": "Temporal artifacts: AUC on the generator's labels (all contents' clips)",
                 "header": ["artifact", "attention model", "classical detector", "labelled clips"],
                 "rows": auc_rows}]

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        if confusion is not None:  # the clients' choices: ARI comes from the platform
            return {}
        d, rows = self.dataset, self.test_rows
        pred, truth = self.test_predictions(models), d.ssim[rows]
        out = {"srcc": srcc(pred, truth), "plcc": plcc(pred, ssim_logit(truth))}
        test = replace(d, level=d.level[rows], content=d.content[rows], ladder=d.ladder[rows])
        out["srcc_within"] = float(np.mean([srcc(pred[at], truth[at]) for at in _ladders(test)]))
        for g, codec in enumerate(CODECS):
            at = d.codec[rows] == g
            out[f"srcc_{codec}"] = srcc(pred[at], truth[at])
        return out

    def final_report(self, models: Params) -> dict[str, Any]:
        """The test encodes' predicted against true SSIM by ladder (a scatter), and the figure
        of one frame: its block means, its saliency and each detector's map."""
        d, rows = self.dataset, self.test_rows
        pred = 1 / (1 + np.exp(-self.test_predictions(models)))
        show = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), SCATTER_POINTS)).astype(np.int64))
        names = list(LADDERS)
        return {"quality_scatter": {"predicted": np.round(100 * pred[show], 2).tolist(),
                                    "proxy": np.round(100 * d.ssim[rows[show]], 2).tolist(),
                                    "distortion": [names[i] for i in d.ladder[rows[show]]],
                                    "family_names": list(CODECS)},
                "artifact_maps": {"names": ["frame", "saliency", *DETECTORS], "maps": np.round(d.figure, 5).tolist(),
                                  "caption": f"{FIGURE[0]} content, {FIGURE[1]} at {FIGURE[2]}, frame {FIGURE[3]}: "
                                             "block means, saliency and each detector on the 8x8 grid"},
                "data_tables": self.data_tables()}


def directions(d: SSTAMSet, detector: int, ladder: int | None = None) -> np.ndarray:
    """Spearman rho of a detector (saliency-weighted) with the level, per (content, ladder)
    (only ``ladder`` when given), sign flipped for sharpness (which should fall)."""
    sign = -1.0 if DETECTORS[detector] == "sharpness" else 1.0
    return np.array([sign * srcc(d.level[at], d.features[at, 0, detector]) for at in _ladders(d)
                     if ladder is None or d.ladder[at][0] == ladder])


def _ladders(d: SSTAMSet) -> list[np.ndarray]:
    """Row masks of each (content, ladder) pair present."""
    return [(d.content == c) & (d.ladder == l) for c in np.unique(d.content) for l in np.unique(d.ladder)
            if np.any((d.content == c) & (d.ladder == l))]


def _squared_error(model: QualityModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()
