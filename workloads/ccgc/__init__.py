"""Cluster-guided contrastive graph clustering (CCGC; Yang et al., AAAI 2023), federated.

Each client holds a subgraph of an attributed graph (a seeded contextual SBM, or the paper's
Planetoid / ``*_feat.npy`` files): its nodes and the edges among them. It smooths its
features once with Â^t (parameter-free), and every round trains CCGC's two encoders from
the global ones for ``train.local_steps`` full-batch epochs: the warm-up loss for the first
``ccgc.warmup_rounds`` rounds, then the cluster-guided loss under the global centres. FedAvg
averages the encoders.

The global cluster centres are federated k-means, exact under FedAvg's example-weighted
average. The model carries, besides the encoders (``view1.*``, ``view2.*``):

- ``centre`` (K, dims): the centres the last round used;
- ``centre_sum`` (K, dims) and ``centre_count`` (K,): each client's per-cluster sums and
  counts of its fused embeddings under ``centre`` (embedded with the encoders it received),
  divided by its number of nodes; averaged with weights n_c / N they become
  (sum over clients) / N, whose ratio is the pooled per-cluster mean: one exact Lloyd step.

At the start of a round every client computes the same centres, ``centre_sum /
centre_count`` (``centre`` where a count is 0), assigns its nodes to them, picks its
high-confidence nodes (distance below its own tau-quantile) and sends the new statistics
and the centres it used. Nothing but encoder weights and K x dims statistics leaves a client.

Initial centres: seeded k-means++ on the fused embeddings (initial encoders) of a seeded
sample of ``ccgc.init_sample`` nodes, drawn by the server from the simulated federation's
data, the same data its evaluator scores (a stand-in for a public seed set; a deployment
without one would need a federated seeding step). Lloyd steps then run from round 1, so the
centres follow the embedding through the warm-up.

``central_metrics`` embeds every client's subgraph with the global encoders, assigns the
nodes to the global centres and scores them against the truth (ACC, NMI, node ARI,
macro-F1); ``refit_nmi`` is k-means refitted on the pooled global embedding (how good the
embedding is, whatever the federated centres). ``baselines`` are the same scenario with
``ccgc.method`` set to a reference computed by the server's evaluator on the pooled data:
k-means on the raw features, on each client's locally smoothed features, on features
smoothed over the whole graph, spectral clustering on the whole graph, and CCGC trained
centrally on the whole graph (the spec's CPU recipe); ``one-client`` runs the federated code
with one client holding the whole graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads import streams, torch_train
from workloads.base import ConfigField, DeviceFiles, Params, TrainSettings, Workload, non_negative, positive, some_of
from workloads.ccgc import device
from workloads.ccgc.centralised import kmeans_labels, new_encoders, spectral_labels, train_ccgc
from workloads.ccgc.data import (
    PARTITIONS, AttributedGraph, GraphDataError, client_subgraph, contextual_sbm, load_npy_graph, load_planetoid,
    split_nodes,
)
from workloads.ccgc.kmeans import assign, centres_from, client_statistics, kmeans, seed_centres
from workloads.ccgc.metrics import clustering_scores
from workloads.ccgc.model import (
    SAMPLE_SHARE, Encoders, cluster_guided_terms, confident_nodes, embed, smooth_features, warmup_loss,
)

STREAM_GRAPH = streams.CCGC_GRAPH
STREAM_SPLIT = streams.CCGC_SPLIT
STREAM_INIT = streams.CCGC_INIT
STREAM_CENTRES = streams.CCGC_CENTRES
STREAM_SAMPLE = streams.CCGC_SAMPLE

SOURCES = ("csbm", "planetoid", "npy")
REFERENCES = ("kmeans-raw", "kmeans-smoothed", "kmeans-smoothed-full", "spectral", "centralised")
METHODS = ("ccgc", *REFERENCES)
BASELINES = (*REFERENCES, "one-client")
CENTRE_KEYS = ("centre", "centre_sum", "centre_count")


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must lie in (0, 1]"


def _unit_interval(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must lie in [0, 1]"


def _at_least_two(v: int) -> str | None:
    return None if v >= 2 else "must be >= 2"


_baseline_list = some_of(BASELINES, "baseline", empty_ok=True)


@dataclass(frozen=True)
class GraphCohort:
    """A cohort's subgraphs, nodes concatenated client after client."""

    client_ids: np.ndarray  # (B,) int64
    starts: np.ndarray  # (B + 1,) offsets of each client's nodes
    node_ids: np.ndarray  # (n,) node ids in the whole graph
    features: np.ndarray  # (n, d) float32 raw features
    smoothed: np.ndarray  # (n, d) float32: Â^t X over the client's own subgraph (centred: ``local_features``)
    labels: np.ndarray | None = None  # (n,) true classes (scoring only); None when unknown

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.starts)

    def rows(self, j: int) -> slice:
        return slice(int(self.starts[j]), int(self.starts[j + 1]))


def _offsets(counts: list[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class CCGCClustering(Workload, DeviceFiles):
    name = "ccgc_clustering"
    section = "ccgc"
    key_metric = "nmi"
    loss_name = "cluster_loss"
    higher_is_better = True
    single_model = True  # one pair of encoders and one set of centres
    summary_metrics = ("acc", "node_ari", "f1", "refit_nmi")
    plot_metrics = ("acc",)
    schema = {
        "source": ConfigField(str, "csbm", "the graph: a seeded contextual SBM, or Planetoid / *_feat.npy files "
                              "under data_dir", choices=SOURCES),
        "data_dir": ConfigField(str, "", "folder of the graph files (source planetoid or npy)"),
        "dataset": ConfigField(str, "cora", "the files' dataset name (ind.<name>.* or <name>_feat.npy)"),
        "nodes": ConfigField(int, 1200, "CSBM nodes", _at_least_two),
        "clusters": ConfigField(int, 4, "CSBM classes (real data: the files' classes)", _at_least_two),
        "feature_dim": ConfigField(int, 64, "CSBM feature dimension", positive),
        "degree": ConfigField(float, 10.0, "CSBM mean degree", positive),
        "homophily": ConfigField(float, 0.6, "CSBM share of edges inside a class", _unit_interval),
        "mu": ConfigField(float, 0.2, "CSBM spread of the class means, M_k ~ N(0, mu^2 I)", non_negative),
        "imbalance": ConfigField(float, 0.5, "CSBM class priors grow linearly to 1 + imbalance", non_negative),
        "partition": ConfigField(str, "random", "who holds which nodes: a random split, or each client only "
                                 "classes_per_client classes", choices=PARTITIONS),
        "classes_per_client": ConfigField(int, 2, "classes a client holds (partition disjoint-classes)", positive),
        "smoothing_steps": ConfigField(int, 3, "t in Â^t X (parameter-free smoothing)", non_negative),
        "centring": ConfigField(str, "client", "subtract each client's mean of its smoothed features (client) or "
                                "not (none): smoothing inside a connected subgraph keeps the client's own mean, "
                                "which k-means then finds instead of the classes", choices=("client", "none")),
        "dims": ConfigField(int, 128, "embedding dimension of each encoder", positive),
        "tau": ConfigField(float, 0.5, "high-confidence quantile of the distance to the centre", _fraction),
        "alpha": ConfigField(float, 0.5, "weight of the negative (centre) term", non_negative),
        "warmup_rounds": ConfigField(int, 10, "rounds of the warm-up loss before the cluster-guided one",
                                     non_negative),
        "init_sample": ConfigField(int, 512, "nodes of the seeded sample the initial centres are drawn from",
                                   positive),
        "method": ConfigField(str, "ccgc", "what the run scores: federated CCGC, or a reference computed by the "
                              "server's evaluator on the pooled data", choices=METHODS),
        "baselines": ConfigField(list, ["kmeans-raw", "kmeans-smoothed", "kmeans-smoothed-full", "spectral",
                                        "centralised"],
                                 "reference runs after the federation: " + ", ".join(BASELINES), _baseline_list),
        "central_epochs": ConfigField(int, 200, "centralised CCGC: epochs", positive),
        "central_warmup_epochs": ConfigField(int, 50, "centralised CCGC: warm-up epochs", non_negative),
        "central_refresh": ConfigField(int, 10, "centralised CCGC: epochs between k-means refreshes", positive),
        "central_lr": ConfigField(float, 1e-3, "centralised CCGC: Adam step size", positive),
    }

    # ---- scenario-level hooks -----------------------------------------------------------

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        cc, fed = scenario[cls.section], scenario["federation"]
        problems = torch_train.check_device(scenario)
        if cc["source"] == "csbm":
            if cc["nodes"] < 2 * cc["clusters"]:
                problems.append(("ccgc.nodes", f"{cc['nodes']} nodes cannot hold {cc['clusters']} clusters "
                                 "of at least 2"))
            elif cc["degree"] * cc["nodes"] / 2 > cc["nodes"] * (cc["nodes"] - 1) / 4:
                problems.append(("ccgc.degree", f"{cc['degree']} is too dense for {cc['nodes']} nodes"))
            labels = None if problems else cls.load_graph(cc, fed["seed"]).labels
        else:
            if not cc["data_dir"]:
                return problems + [("ccgc.data_dir", f"source {cc['source']!r} reads files: name their folder")]
            if not Path(cc["data_dir"]).is_dir():
                return problems + [("ccgc.data_dir", f"{cc['data_dir']!r} is not a folder")]
            try:
                labels = cls.load_graph(cc, fed["seed"]).labels
            except GraphDataError as err:
                return problems + [("ccgc.data_dir", str(err))]
        if labels is not None:
            if fed["clients"] > len(labels):
                problems.append(("federation.clients", f"{fed['clients']} clients for {len(labels)} nodes"))
            else:
                try:
                    cls.split(cc, labels, fed["clients"], fed["seed"])
                except ValueError as err:
                    field = "ccgc.classes_per_client" if cc["partition"] == "disjoint-classes" else "ccgc.partition"
                    problems.append((field, str(err)))
        return problems

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """References by name: one round in which the server's evaluator computes the
        reference (``ccgc.method``), and ``one-client`` (the federated code, one client
        holding the whole graph, the same rounds)."""
        cc = scenario[cls.section]
        if cc["method"] != "ccgc":
            return {}
        runs: dict[str, dict[str, dict[str, Any]]] = {
            name: {"run": {"rounds": 1, "strategies": ["fedavg"]}, "ccgc": {"method": name}} for name in REFERENCES
        }
        runs["one-client"] = {"run": {"strategies": ["fedavg"]}, "ccgc": {"partition": "random"},  # one client holds all
                              "federation": {"clients": 1, "cohort_size": 1, "participation": 1.0, "dropout": 0.0}}
        return {name: runs[name] for name in cc["baselines"]}

    # ---- the graph and who holds it ------------------------------------------------------

    @staticmethod
    def load_graph(options: dict[str, Any], seed: int) -> AttributedGraph:
        if options["source"] == "planetoid":
            return load_planetoid(options["data_dir"], options["dataset"])
        if options["source"] == "npy":
            return load_npy_graph(options["data_dir"], options["dataset"])
        return contextual_sbm(
            nodes=int(options["nodes"]), clusters=int(options["clusters"]), features=int(options["feature_dim"]),
            degree=float(options["degree"]), homophily=float(options["homophily"]), mu=float(options["mu"]),
            imbalance=float(options["imbalance"]), seed=np.random.SeedSequence([seed, STREAM_GRAPH]),
        )

    @staticmethod
    def split(options: dict[str, Any], labels: np.ndarray, clients: int, seed: int) -> list[np.ndarray]:
        return split_nodes(labels, clients, scheme=options["partition"],
                           classes_per_client=int(options["classes_per_client"]),
                           seed=np.random.SeedSequence([seed, STREAM_SPLIT]))

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread
        super().__init__(scenario)
        self.options = dict(scenario[self.section])
        self.method = str(self.options["method"])
        self.smoothing_steps = int(self.options["smoothing_steps"])
        self.dims, self.tau, self.alpha = int(self.options["dims"]), float(self.options["tau"]), float(self.options["alpha"])
        self._model: Encoders | None = None

    @cached_property
    def graph(self) -> AttributedGraph:
        return self.load_graph(self.options, self.seed)

    @cached_property
    def parts(self) -> list[np.ndarray]:
        return self.split(self.options, self.graph.labels, self.num_clients, self.seed)

    @property
    def num_classes(self) -> int:
        return int(self.graph.labels.max()) + 1

    @property
    def model(self) -> Encoders:
        if self._model is None:
            self._model = Encoders(self.graph.features.shape[1], self.dims)
        return self._model

    # ---- the core: data -------------------------------------------------------------------

    def client_data(self, client_ids: np.ndarray) -> GraphCohort:
        ids = np.asarray(client_ids, dtype=np.int64)
        subgraphs = [(self.parts[int(c)], client_subgraph(self.graph, self.parts[int(c)])) for c in ids]
        d = self.graph.features.shape[1]

        def stack(arrays: list[np.ndarray], dtype: type, width: int | None = None) -> np.ndarray:
            empty = np.empty((0, width) if width else 0, dtype)
            return np.concatenate(arrays).astype(dtype) if arrays else empty

        return GraphCohort(
            client_ids=ids, starts=_offsets([len(nodes) for nodes, _ in subgraphs]),
            node_ids=stack([nodes for nodes, _ in subgraphs], np.int64),
            features=stack([g.features for _, g in subgraphs], np.float32, d),
            smoothed=stack([self.local_features(g) for _, g in subgraphs], np.float32, d),
            labels=stack([g.labels for _, g in subgraphs], np.int64),
        )

    device_format = device.FORMAT

    def device_files(self, data: GraphCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data, self.graph.adjacency)

    def read_device_files(self, files: list[Any]) -> GraphCohort:
        """A device's subgraphs, each smoothed by the device itself (``local_features``); no
        labels: scoring is the server's, on its own copy of the truth."""
        subgraphs = device.read_device_files(files, self.num_clients, self.graph.features.shape[1],
                                             self.graph.num_nodes)
        return GraphCohort(
            client_ids=np.array([g.client_id for g in subgraphs], np.int64),
            starts=_offsets([len(g.node_ids) for g in subgraphs]),
            node_ids=np.concatenate([g.node_ids for g in subgraphs]),
            features=np.concatenate([g.features for g in subgraphs]),
            smoothed=np.concatenate([self.local_features(g) for g in subgraphs]).astype(np.float32),
        )

    def local_features(self, subgraph: AttributedGraph | device.DeviceSubgraph) -> np.ndarray:
        """What a client trains on: Â^t X over its own subgraph, centred on its own mean
        (``centring = "client"``; a random split's clients differ in that mean by noise only)."""
        x = smooth_features(subgraph.adjacency, subgraph.features, self.smoothing_steps)
        return x - x.mean(0) if self.options["centring"] == "client" and len(x) else x

    def subset(self, data: GraphCohort, index: np.ndarray) -> GraphCohort:
        index = np.asarray(index, dtype=np.int64)
        pieces = [np.arange(data.starts[j], data.starts[j + 1]) for j in index]
        rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        return GraphCohort(client_ids=data.client_ids[index], starts=_offsets(data.num_examples[index]),
                           node_ids=data.node_ids[rows], features=data.features[rows], smoothed=data.smoothed[rows],
                           labels=None if data.labels is None else data.labels[rows])

    @cached_property
    def federation_data(self) -> GraphCohort:
        """Every client's subgraph, for the server's evaluator (simulation only)."""
        return self.client_data(np.arange(self.num_clients))

    # ---- the model ------------------------------------------------------------------------

    def initial_parameters(self) -> Params:
        """Encoders from the seed; centres by k-means++ on a seeded node sample (module
        docstring); empty Lloyd statistics."""
        seed = int(np.random.SeedSequence([self.seed, STREAM_INIT]).generate_state(1)[0])
        model = new_encoders(self.graph.features.shape[1], self.dims, seed)
        params = torch_train.get_params(model)
        data = self.federation_data
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, STREAM_CENTRES]))
        sample = rng.choice(len(data.node_ids), size=min(int(self.options["init_sample"]), len(data.node_ids)),
                            replace=False)
        points = embed(model, data.smoothed[np.sort(sample)])
        k = self.num_classes
        params["centre"] = seed_centres(points, k, int(rng.integers(2**31)))
        params["centre_sum"] = np.zeros((k, self.dims))
        params["centre_count"] = np.zeros(k)
        return params

    def _encoders(self, params: Params) -> Encoders:
        return torch_train.set_params(self.model, {n: v for n, v in params.items() if n not in CENTRE_KEYS})

    @staticmethod
    def centres(params: Params) -> np.ndarray:
        """The centres a round works with: the averaged Lloyd statistics' means."""
        return centres_from(params["centre_sum"], params["centre_count"], params["centre"])

    def _guidance(self, points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster of each node, high-confidence nodes) under the global centres."""
        labels, distance = assign(points, centres)
        return labels, confident_nodes(distance, self.tau)

    def local_loss(self, params: Params, data: GraphCohort) -> np.ndarray:
        """The cluster-guided loss under the received encoders and centres, in expectation
        over the pair sampling, with the positive part per sampled pair (comparable across
        client sizes); 0 in a reference run."""
        out = np.zeros(len(data.client_ids))
        if self.method != "ccgc":  # a reference run trains nothing: no loss to report
            return out
        model, centres = self._encoders(params), self.centres(params)
        for j in range(len(data.client_ids)):
            x = torch.as_tensor(np.array(data.smoothed[data.rows(j)]))
            with torch.no_grad():
                z1, z2 = model(x)
                labels, confident = self._guidance(((z1 + z2) / 2).double().numpy(), centres)
                terms = cluster_guided_terms(z1, z2, labels, confident, clusters=len(centres), rng=None,
                                             fallback_centres=centres)
            counts = np.bincount(labels[confident], minlength=len(centres))
            pairs = max(int(np.sum((counts * SAMPLE_SHARE).astype(np.int64))), 1)
            out[j] = float(terms.positive.sum()) / pairs + self.alpha * float(terms.negative)
        return out

    def local_train(self, start: Params, data: GraphCohort, settings: TrainSettings) -> Params:
        """Per client, from the global model: one Lloyd step's statistics under the global
        centres (embedded with the received encoders), then ``local_steps`` full-batch Adam
        epochs on the warm-up loss (rounds <= ``warmup_rounds``) or the cluster-guided loss
        with this round's assignment (pairs sampled from a stream per client and round)."""
        if self.method != "ccgc":  # a reference run: the server's evaluator does the work
            return {n: np.array(v) for n, v in start.items()}
        stats = {key: np.zeros_like(start[key], dtype=np.float64) for key in CENTRE_KEYS}
        warmup = settings.server_round <= int(self.options["warmup_rounds"])
        optimizer = partial(torch.optim.Adam, lr=settings.lr)

        def train(j: int, model: torch.nn.Module) -> None:
            x = torch.as_tensor(np.array(data.smoothed[data.rows(j)]))
            centres = self.centres({key: start[key][j] for key in CENTRE_KEYS})
            points = embed(model, x)
            stats["centre"][j] = centres
            stats["centre_sum"][j], stats["centre_count"][j] = client_statistics(points, centres)
            if warmup:
                def objective(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
                    return warmup_loss(*model(x))
            else:
                labels, confident = self._guidance(points, centres)
                rng = np.random.default_rng(np.random.SeedSequence(
                    [self.seed, STREAM_SAMPLE, int(data.client_ids[j]), settings.server_round]))

                def objective(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
                    z1, z2 = model(x)
                    return cluster_guided_terms(z1, z2, labels, confident, clusters=len(centres), rng=rng,
                                                fallback_centres=centres).loss(self.alpha)

            torch_train.train_steps(model, objective, torch_train.minibatches((x,), torch_train.full_batch(),
                                                                               self.torch_device),
                                    steps=settings.local_steps, optimizer=optimizer,
                                    proximal_mu=settings.proximal_mu)

        encoders = {n: v for n, v in start.items() if n not in CENTRE_KEYS}
        trainer = torch_train.on_device(self.model, self.torch_device)
        out = torch_train.train_clients(trainer, encoders, train)
        return {**out, **stats}

    # ---- server-side metrics ----------------------------------------------------------------

    def _score(self, predicted: np.ndarray) -> dict[str, float]:
        scores = clustering_scores(self.federation_data.labels, predicted)
        return {"nmi": scores["nmi"], "acc": scores["acc"], "node_ari": scores["ari"], "f1": scores["f1"]}

    @cached_property
    def reference_scores(self) -> dict[str, float]:
        """The reference clustering ``ccgc.method`` names, scored on the federation's nodes."""
        data, graph, k, seed = self.federation_data, self.graph, self.num_classes, self.seed
        o = self.options
        if self.method == "kmeans-raw":
            labels = kmeans_labels(data.features, k, seed)
        elif self.method == "kmeans-smoothed":  # what the clients train on: smoothed over their own subgraphs
            labels = kmeans_labels(data.smoothed, k, seed)
        else:  # over the whole graph, as one machine holding it would
            if self.method == "kmeans-smoothed-full":
                labels = kmeans_labels(smooth_features(graph.adjacency, graph.features, self.smoothing_steps), k, seed)
            elif self.method == "spectral":
                labels = spectral_labels(graph.adjacency, k, seed)
            else:
                run = train_ccgc(smooth_features(graph.adjacency, graph.features, self.smoothing_steps), clusters=k,
                                 dims=self.dims, lr=float(o["central_lr"]), epochs=int(o["central_epochs"]),
                                 warmup_epochs=int(o["central_warmup_epochs"]),
                                 refresh_every=int(o["central_refresh"]), tau=self.tau, alpha=self.alpha, seed=seed)
                labels = run.labels
            labels = labels[data.node_ids]  # whole-graph order -> the federation's order
        return self._score(labels)

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        """Every node embedded by its client's subgraph and the global encoders, assigned to
        the global centres, scored against the truth; ``refit_nmi``: k-means refitted on
        the pooled embedding."""
        if self.method != "ccgc":
            return dict(self.reference_scores)
        params = {n: v[0] for n, v in models.items()}
        data = self.federation_data
        points = embed(self._encoders(params), data.smoothed)  # smoothing is per row: one pass for all
        out = self._score(assign(points, self.centres(params))[0])
        out["refit_nmi"] = self._score(kmeans(points, self.num_classes, self.seed)[0])["nmi"]
        return out
