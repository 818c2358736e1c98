"""Imbalanced semantic segmentation through neural collapse: the CeCo centre regulariser, federated.

CeCo (Zhong et al., CVPR 2023) adds a training-only branch that pulls the class feature
centres toward a fixed simplex equiangular tight frame (ETF). No official code exists; the
loss is reconstructed (``model``; ``shared/specs/segmentation-neural-collapse.md``).

Each client holds generated greyscale scenes of shapes (``data``: K = 6 classes, severe or
mild imbalance, the two rarest classes the tail) of its own *scene type*, a class mix and a
ground level (client c is of type c mod ``scene_groups``: the hidden groups of
``clustered-fedavg`` with ``anchor-models`` and IFCA; ARI in the record). Every round each
client trains the small U-Net (``model.UNet``) for ``train.local_steps`` Adam steps on its
own scenes (random flips and transposes) from the model it received, with its arm's loss:

- ``ce``: pixel cross-entropy;
- ``weighted-ce``: class-weighted cross-entropy (``freq^-class_weight_power`` from the client's
  own pixel counts);
- ``ceco``: cross-entropy + ``lambda`` x CeCo, the centres of the classes present in the
  batch (the 1x1 ``ceco_head`` on the decoder's features) classified against the fixed ETF
  at ``temperature``. The ETF is derived from the scenario seed on every client and the
  server alike (``model.simplex_etf``); it is a constant of the loss, never in the model
  the server averages. The head is averaged like every other weight; ``forward`` never uses
  it, so inference is the same network in every arm.

The arms are the workload's variants, each run on the same federation and seed (paired);
the client learns its arm from ``settings.variant``.

Server side (``central_metrics``): class-balanced test scenes of each scene type (a k-model
strategy: the scenes of a type pick the model of least cross-entropy on their first
``pick_images``, as a new client of that type would). Per-class IoU (``iou_<class>``),
``miou`` (all six classes), ``tail_iou`` (diamond and ring), ``miou_scene<g>``; and neural
collapse: ``etf_closeness`` = mean over class pairs of |cos + 1/(K-1)| of the decoder
features' class means (centred by their mean, normalised) on each type's test scenes
(averaged over types; 0 is a simplex ETF) and ``etf_distance`` = mean over classes of
1 - cos(CeCo-branch centre, its ETF column) (the regulariser's own target).
``local_evaluate`` adds ``ceco_loss`` (the CeCo term over all a client's scenes; the run
record keeps only the loss of the federated evaluation).

``baselines``: ``centralised``, one client holding every client's scenes (``pool_clients``),
each arm trained for as many steps as the whole federation takes (FedAvg of one client).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from workloads import streams, torch_train
from workloads.base import (
    ConfigField, DeviceFiles, KnownClusters, Params, TrainSettings, Workload, non_negative, pooled_baselines,
    positive, some_of,
)
from workloads.ceco import device
from workloads.ceco.data import CLASSES, IMBALANCES, TAIL, SceneSettings, client_scenes, held_out_scenes
from workloads.ceco.model import (
    UNet, branch_names, ceco_loss, class_centres, class_weights, confusion, etf_closeness, etf_distance, iou,
    loss_terms, simplex_etf,
)
from workloads.device_files import offsets, rows_of

ARMS = ("ce", "weighted-ce", "ceco")
K = len(CLASSES)
BASELINES = ("centralised",)
K_MODEL_STRATEGIES = ("clustered-fedavg", "clustered-fedprox", "ifca", "oracle")


_arms = some_of(ARMS, "arm", "an")


def _widths(v: list) -> str | None:
    if not v or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in v):
        return "must be a non-empty list of positive integers (channels per level)"
    return None


@dataclass(frozen=True, kw_only=True)
class SceneCohort:
    """A cohort's scenes: client j's images are rows ``starts[j]:starts[j + 1]``."""

    client_ids: np.ndarray  # (B,) int64
    images: np.ndarray  # (N, 1, s, s) float32
    masks: np.ndarray  # (N, s, s) int64
    starts: np.ndarray  # (B + 1,)
    groups: np.ndarray | None = None  # (B,) scene type (the true cluster); None on a device

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)


def _dihedral(x: torch.Tensor, y: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of 8 flips/transposes of a batch (images (B, 1, s, s), masks (B, s, s))."""
    if code & 1:
        x, y = x.flip(-1), y.flip(-1)
    if code & 2:
        x, y = x.flip(-2), y.flip(-2)
    if code & 4:
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    return x, y


class CeCoSegmentation(Workload, KnownClusters, DeviceFiles):
    name = "ceco_segmentation"
    section = "ceco"
    key_metric = "miou"
    higher_is_better = True
    summary_metrics = ("tail_iou", *(f"iou_{c}" for c in CLASSES), "etf_closeness", "etf_distance")
    plot_metrics = ("tail_iou", "etf_closeness", "etf_distance")
    schema = {
        "arms": ConfigField(list, list(ARMS), "losses compared: " + ", ".join(ARMS), _arms),
        "imbalance": ConfigField(str, "severe", "class presence and shape sizes (data module)", choices=IMBALANCES),
        "scene_groups": ConfigField(int, 2, "scene types (class mixes), the hidden groups", choices=(1, 2)),
        "images_per_client": ConfigField(int, 200, "scenes held by each client", positive),
        "test_per_group": ConfigField(int, 150, "class-balanced test scenes per scene type", positive),
        "inverted_type1": ConfigField(bool, False, "scene type 1 in inverted contrast (besides its class mix)"),
        "image_size": ConfigField(int, 32, "scene side in pixels (a multiple of 2^(levels - 1))", positive),
        "noise": ConfigField(float, 0.08, "sd of the pixel noise", non_negative),
        "widths": ConfigField(list, [8, 16, 32], "U-Net channels per level (the first: the feature width)", _widths),
        "head_dim": ConfigField(int, 16, "CeCo branch's dimension d (>= 6, the classes)", positive),
        "lambda": ConfigField(float, 0.4, "weight of the CeCo term", non_negative),
        "temperature": ConfigField(float, 0.1, "temperature of the centres' cosines with the ETF", positive),
        "class_weight_power": ConfigField(float, 0.5, "weighted-ce: weights freq^-power", non_negative),
        "batch_size": ConfigField(int, 16, "local minibatch size", positive),
        "pick_images": ConfigField(int, 32, "test scenes of a type that pick its model (k-model strategies)",
                                   positive),
        "preview": ConfigField(int, 4, "test scenes drawn with their predictions (final report)", non_negative),
        "pool_clients": ConfigField(int, 0, "> 0: client 0 holds the scenes of clients 0..pool_clients-1 "
                                    "(the centralised baseline)", non_negative),
        "baselines": ConfigField(list, ["centralised"], "reference runs after the federation (in-process): "
                                 + ", ".join(BASELINES), some_of(BASELINES, "baseline", empty_ok=True)),
    }

    # ---- scenario -------------------------------------------------------------------------

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        c, fed = scenario[cls.section], scenario["federation"]
        problems = torch_train.check_device(scenario)
        if c["head_dim"] < K:
            problems.append(("ceco.head_dim", f"{c['head_dim']} is below the {K} classes: the ETF is built by QR "
                             f"of a d x {K} draw"))
        step = 2 ** (len(c["widths"]) - 1)
        if c["image_size"] % step:
            problems.append(("ceco.image_size", f"{c['image_size']} is not a multiple of {step} "
                             f"({len(c['widths'])} U-Net levels halve it {len(c['widths']) - 1} times)"))
        if c["pool_clients"] and fed["clients"] != 1:
            problems.append(("ceco.pool_clients", f"pools the scenes into one client, but federation.clients is "
                             f"{fed['clients']}"))
        k_model = [s for s in scenario["run"]["strategies"] if s in K_MODEL_STRATEGIES]
        if k_model and fed["clients"] < c["scene_groups"]:
            problems.append(("federation.clients", f"{fed['clients']} clients cannot hold {c['scene_groups']} "
                             f"scene types ({k_model[0]} looks for them)"))
        return problems

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        anchors, groups = scenario["anchors"]["count"], scenario[cls.section]["scene_groups"]
        if anchors < groups:
            return [("anchors.count", f"{anchors} anchors cannot cover {groups} scene types: Phase 1 needs one per "
                     "type (anchors are clients 0..count-1, client c holds scenes of type c mod scene_groups)")]
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """``centralised``: one client with every client's scenes, as many steps as the federation."""
        return pooled_baselines(cls.section, scenario)

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread
        super().__init__(scenario)
        self.options = dict(scenario[self.section])
        self.scenes = SceneSettings.from_options(self.options)
        self.arms = tuple(self.options["arms"])
        self.widths = tuple(int(w) for w in self.options["widths"])
        self.head_dim = int(self.options["head_dim"])
        self.etf = simplex_etf(K, self.head_dim, self.seed)  # (d, K): the same on every client
        self._etf = torch.tensor(self.etf, dtype=torch.float32)
        self._model = UNet(self.widths, K, self.head_dim)
        self._trainer = torch_train.on_device(self._model, self.torch_device)
        self._trainer_etf = self._etf.to(self.torch_device)

    def variants(self) -> tuple[str, ...]:
        return self.arms

    # ---- clusters -------------------------------------------------------------------------

    @property
    def num_clusters(self) -> int:
        return int(self.options["scene_groups"])

    def true_clusters(self, data: SceneCohort) -> np.ndarray | None:
        return data.groups

    # ---- data -----------------------------------------------------------------------------

    def client_data(self, client_ids: np.ndarray) -> SceneCohort:
        ids = np.asarray(client_ids, np.int64)
        pool = int(self.options["pool_clients"])
        held = [list(range(pool)) if pool else [int(c)] for c in ids]
        images, masks, sizes = [], [], []
        for owners in held:
            parts = [client_scenes(self.scenes, self.seed, o) for o in owners]
            images += [p[0] for p in parts]
            masks += [p[1] for p in parts]
            sizes.append(sum(len(p[0]) for p in parts))
        groups = None if pool else np.array([self.scenes.group_of(c) for c in ids], np.int64)
        return SceneCohort(client_ids=ids, images=np.concatenate(images), masks=np.concatenate(masks),
                           starts=offsets(sizes), groups=groups)

    def subset(self, data: SceneCohort, index: np.ndarray) -> SceneCohort:
        index = np.asarray(index, np.int64)
        rows = rows_of(data.starts, index)
        return replace(data, client_ids=data.client_ids[index], images=data.images[rows], masks=data.masks[rows],
                       starts=offsets(data.num_examples[index]),
                       groups=None if data.groups is None else data.groups[index])

    device_format = device.FORMAT

    def device_files(self, data: SceneCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> SceneCohort:
        return SceneCohort(**device.read_device_files(files, self.num_clients, self.scenes.image_size, K))

    @cached_property
    def test_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in held_out_scenes(self.scenes, self.seed)]

    # ---- the model ------------------------------------------------------------------------

    def _draw(self, seed: int, j: int) -> Params:
        with torch.random.fork_rng():
            torch.manual_seed(int(np.random.SeedSequence([seed, streams.CECO_INIT, j]).generate_state(1)[0]))
            net = UNet(self.widths, K, self.head_dim)
        return torch_train.get_params(net, by="state_dict")

    def initial_parameters(self) -> Params:
        return self._draw(self.seed, 0)

    def random_models(self, k: int, seed: int) -> Params:
        """k independent draws of the network's own initialisation, stacked (IFCA's start)."""
        draws = [self._draw(seed, j) for j in range(k)]
        return {n: np.stack([d[n] for d in draws]) for n in draws[0]}

    def _load(self, params: Params, model: UNet | None = None) -> UNet:
        model = self._model if model is None else model
        torch_train.set_params(model, params, by="state_dict")
        model.eval()
        return model

    def _client(self, data: SceneCohort, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = int(data.starts[j]), int(data.starts[j + 1])
        return torch.from_numpy(data.images[lo:hi]), torch.from_numpy(data.masks[lo:hi])

    def local_loss(self, params: Params, data: SceneCohort) -> np.ndarray:
        """Each client's mean pixel cross-entropy on its scenes (what a client picks a model by)."""
        net = self._load(params)
        out = np.zeros(len(data.client_ids))
        with torch.no_grad():
            for j in range(len(data.client_ids)):
                x, y = self._client(data, j)
                out[j] = float(F.cross_entropy(net(x), y))
        return out

    def local_evaluate(self, params: Params, data: SceneCohort) -> dict[str, np.ndarray]:
        """Sums over each client's scenes: the cross-entropy and the CeCo term (the centres of
        all its scenes against the ETF; whatever the arm)."""
        net = self._load(params)
        loss, reg = np.zeros(len(data.client_ids)), np.zeros(len(data.client_ids))
        n = data.num_examples
        t = float(self.options["temperature"])
        with torch.no_grad():
            for j in range(len(data.client_ids)):
                x, y = self._client(data, j)
                feats = net.features(x)
                loss[j] = float(F.cross_entropy(net.classifier(feats), y)) * n[j]
                reg[j] = float(ceco_loss(net.ceco_head(feats), y, self._etf, t)) * n[j]
        return {"loss": loss, "ceco_loss": reg}

    # ---- local training -------------------------------------------------------------------

    def _batches(self, data: SceneCohort, j: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        x, y = self._client(data, j)
        for idx in torch_train.numpy_epochs(len(x), int(self.options["batch_size"]), rng):
            xb, yb = _dihedral(x[idx], y[idx], int(rng.integers(8)))
            yield xb.to(self.torch_device), yb.to(self.torch_device)

    def local_train(self, start: Params, data: SceneCohort, settings: TrainSettings) -> Params:
        """``local_steps`` Adam steps per client with its arm's loss (``settings.variant``;
        plain cross-entropy in Phase 1's anchor training)."""
        arm = settings.variant or "ce"
        if arm not in ARMS:
            raise ValueError(f"unknown CeCo arm {arm!r}; expected one of {list(ARMS)}")
        o = self.options
        optimizer = partial(torch.optim.Adam, lr=settings.lr)

        def train(j: int, model: torch.nn.Module) -> None:
            cid = int(data.client_ids[j])
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, streams.CECO_TRAIN, cid,
                                                                settings.server_round]))
            lo, hi = int(data.starts[j]), int(data.starts[j + 1])
            weights = None
            if arm == "weighted-ce":
                weights = class_weights(data.masks[lo:hi], K, float(o["class_weight_power"])).to(self.torch_device)
            objective = partial(_objective, arm=arm, etf=self._trainer_etf, weights=weights,
                                lam=float(o["lambda"]), temperature=float(o["temperature"]))
            torch_train.train_steps(model, objective, self._batches(data, j, rng), steps=settings.local_steps,
                                    optimizer=optimizer, proximal_mu=settings.proximal_mu)

        return torch_train.train_clients(self._trainer, start, train, by="state_dict")

    def centre_geometry(self, params: Params, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
        """On the given scenes (all at once): the CeCo term, the branch centres' distance to
        their ETF columns and the decoder features' closeness to a simplex ETF."""
        net = self._load(params)
        x, y = torch.as_tensor(images), torch.as_tensor(masks)
        with torch.no_grad():
            feats = net.features(x)
            z = net.ceco_head(feats)
            means, _ = class_centres(feats, y, K)
            head, present = class_centres(z, y, K)
            reg = float(ceco_loss(z, y, self._etf, float(self.options["temperature"])))
        return {"ceco_loss": reg, "etf_distance": etf_distance(head.double().numpy(), self.etf[:, present.numpy()]),
                "etf_closeness": etf_closeness(means.double().numpy())}

    # ---- server side ----------------------------------------------------------------------

    def _pick(self, models: Params, g: int) -> int:
        """The model a new client of scene type g picks: the least cross-entropy on the type's
        first ``pick_images`` test scenes."""
        k = len(next(iter(models.values())))
        if k == 1:
            return 0
        x, y = self.test_set[g]
        n = int(self.options["pick_images"])
        return int(np.argmin(self.local_loss_of_models(models, x[:n], y[:n])))

    def local_loss_of_models(self, models: Params, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        k = len(next(iter(models.values())))
        out = []
        for i in range(k):
            net = self._load({n: v[i] for n, v in models.items()})
            with torch.no_grad():
                out.append(float(F.cross_entropy(net(x), y)))
        return np.array(out)

    def central_metrics(self, models: Params, confusion_: np.ndarray | None = None) -> dict[str, float]:
        if confusion_ is not None:  # the clients' choices: ARI comes from the platform
            return {}
        total = np.zeros((K, K), np.int64)
        out: dict[str, float] = {}
        closeness, distance = [], []
        for g, (x, y) in enumerate(self.test_set):
            i = self._pick(models, g)
            net = self._load({n: v[i] for n, v in models.items()})
            with torch.no_grad():
                feats = net.features(x)
                pred = net.classifier(feats).argmax(1).numpy()
                means, _ = class_centres(feats, y, K)
                head, _ = class_centres(net.ceco_head(feats), y, K)
            conf = confusion(pred, y.numpy(), K)
            total += conf
            out[f"miou_scene{g}"] = float(np.nanmean(iou(conf)))
            closeness.append(etf_closeness(means.double().numpy()))
            distance.append(etf_distance(head.double().numpy(), self.etf))
        ious = iou(total)
        out.update({f"iou_{c}": float(v) for c, v in zip(CLASSES, ious)})
        out["miou"] = float(np.nanmean(ious))
        out["tail_iou"] = float(np.mean(ious[list(TAIL)]))
        out["etf_closeness"] = float(np.mean(closeness))
        out["etf_distance"] = float(np.mean(distance))
        return out

    def final_report(self, models: Params) -> dict[str, Any]:
        """A few test scenes of each type with their masks and the final model's predictions
        (``label_maps``: the report's ``segmentation.png``)."""
        n = int(self.options["preview"])
        if n == 0:
            return {}
        per = max(1, n // len(self.test_set))
        maps: dict[str, Any] = {"input": [], "truth": [], "prediction": [], "classes": list(CLASSES)}
        for g, (x, y) in enumerate(self.test_set):
            i = self._pick(models, g)
            net = self._load({n_: v[i] for n_, v in models.items()})
            take = _preview_rows(y, per)
            with torch.no_grad():
                pred = net(x[take]).argmax(1)
            maps["input"] += [np.round(a[0], 3).tolist() for a in x[take].numpy()]
            maps["truth"] += [a.tolist() for a in y[take].numpy()]
            maps["prediction"] += [a.tolist() for a in pred.numpy()]
        return {"label_maps": maps}

    def inference_params(self, params: Params) -> Params:
        """One model without the training-only CeCo branch (what a deployment runs)."""
        return {n: v for n, v in params.items() if n not in branch_names(params)}


def _preview_rows(masks: torch.Tensor, count: int) -> np.ndarray:
    """The test scenes that show the most classes (ties: the first), ``count`` of them."""
    shown = np.array([len(np.unique(m)) for m in masks.numpy()])
    return np.sort(np.argsort(-shown, kind="stable")[:count])


def _objective(model: UNet, x: torch.Tensor, y: torch.Tensor, *, arm: str, etf: torch.Tensor,
               weights: torch.Tensor | None, lam: float, temperature: float) -> torch.Tensor:
    return loss_terms(model, x, y, arm, etf=etf, weights=weights, lam=lam, temperature=temperature)[0]
