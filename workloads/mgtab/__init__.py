"""Multi-relational bot and stance detection (MGTAB; Shi et al. 2023), federated by subgraph.

Each client holds a community of users (``partition = "community"``: the generator's
planted communities, or Louvain communities of real MGTAB files; ``"random"``: a random
split) with their features, both labels, their 70/20/10 train/validation/test roles
(MGTAB's split, drawn over the whole graph) and the relations *among its own users*: the
edges between clients are dropped (the spec's choice; a community split keeps about nine in
ten edges of the generator's graph). Every round each client trains the model (``model``:
MLP, GCN, GAT, RGCN or the relation-attention model) for ``train.local_steps`` full-batch
AdamW epochs on its training users from the global model; the loss is the bot head's
cross-entropy plus ``stance_weight`` x the stance head's.

Besides the network's weights the model carries ``age`` (one number per model): every
local training adds 1, so the average over a round's clients counts the rounds the model
has been trained (Phase 1's anchor training counts one). The server's evaluator uses it to
tell a new arm (the age drops) and to choose the checkpoint: ``central_metrics`` scores the
models on every client's validation and test users (a k-model strategy: each client with
the model of least training loss, as clients choose) and reports, besides the round's own
scores (``round_*``, ``val_*``), the test scores of the round with the best validation
macro-F1 so far (``f1_bot``, ``acc_bot``, ``f1_stance``, ``acc_stance``; ``select_on``:
bot, stance or their mean), never the accuracy. Untrained models (age 0) are never
chosen; a clustered arm's Phase-1 models (round 0) are scored but not candidates either,
since the server scores the models handed in (age 0) right after them. A resumed arm
chooses among the rounds after the resumption.

Hidden groups: with ``behaviour_groups = G > 1`` the generator's communities differ in bot
behaviour (community c is in group c mod G), the clusters of the k-model strategies
(``clustered-fedavg`` with ``anchor-models``, IFCA); with one community per client a
client's true cluster is its community's group and the record has the ARI of the clients'
choices.

``baselines`` (in-process, FedAvg): the same federation with another model
(``fedavg-<model>``), RGCN on the best pair of relations only (``fedavg-rgcn-best-pair``),
and one client holding the whole graph with every edge (``centralised``: the scenario's
model; ``centralised-<model>``; ``centralised-rgcn-best-pair``), trained for as many epochs
as a federated client's local steps over all rounds. Names of the scenario's own model
(``fedavg-rgcn`` when it runs RGCN) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads import streams, torch_train
from workloads.base import (
    ConfigField, DeviceFiles, KnownClusters, Params, TrainSettings, Workload, non_negative, positive, some_of,
)
from workloads.mgtab import device
from workloads.mgtab.centralised import SELECT_ON, scores, selection_score
from workloads.mgtab.data import (
    BEST_PAIR, RELATIONS, TEST, TRAIN, VAL, AccountGraph, GeneratorSettings, GraphDataError, generate, load_mgtab,
    partition, split_nodes, subgraph_edges,
)
from workloads.mgtab.model import MODELS, Graph, build_graph, build_model, joint_loss

STREAM_GRAPH = streams.MGTAB_GRAPH
STREAM_SPLIT = streams.MGTAB_SPLIT
STREAM_PARTITION = streams.MGTAB_PARTITION
STREAM_INIT = streams.MGTAB_INIT
STREAM_TRAIN = streams.MGTAB_TRAIN

SOURCES = ("generator", "mgtab")
PARTITIONS = ("community", "random")
BASELINES = (*(f"fedavg-{m}" for m in MODELS), "fedavg-rgcn-best-pair", "centralised",
             *(f"centralised-{m}" for m in MODELS), "centralised-rgcn-best-pair")
AGE = "age"
METRICS = ("acc_bot", "f1_bot", "acc_stance", "f1_stance")


def _fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must lie in [0, 1]"


_relation_list = some_of(RELATIONS, "relation")
_baseline_list = some_of(BASELINES, "baseline", empty_ok=True)


def _at_least(low: int):
    return lambda v: None if v >= low else f"must be >= {low}"


@dataclass(frozen=True)
class AccountCohort:
    """A cohort's subgraphs, users and edges concatenated client after client."""

    client_ids: np.ndarray  # (B,) int64
    starts: np.ndarray  # (B + 1,) offsets of each client's users
    node_ids: np.ndarray  # (n,) ids in the whole graph
    features: np.ndarray  # (n, d) float32
    y_bot: np.ndarray  # (n,) int64
    y_stance: np.ndarray  # (n,) int64
    split: np.ndarray  # (n,) int8: 0 train / 1 validation / 2 test
    edge_starts: np.ndarray  # (B + 1,) offsets of each client's edges
    edges: np.ndarray  # (2, m) local indices within the client
    edge_type: np.ndarray  # (m,)
    groups: np.ndarray | None = None  # (B,) behaviour group (the true cluster); None when unknown

    @property
    def num_examples(self) -> np.ndarray:
        """Training users per client (FedAvg's weights)."""
        return np.array([int((self.split[self.rows(j)] == TRAIN).sum()) for j in range(len(self.client_ids))],
                        np.int64)

    def rows(self, j: int) -> slice:
        return slice(int(self.starts[j]), int(self.starts[j + 1]))

    def edge_rows(self, j: int) -> slice:
        return slice(int(self.edge_starts[j]), int(self.edge_starts[j + 1]))


def _offsets(counts: list[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _pack(ids: np.ndarray, clients: list[dict[str, np.ndarray]], d: int, groups: np.ndarray | None) -> AccountCohort:
    def cat(key: str, dtype: type, empty_shape: tuple) -> np.ndarray:
        parts = [c[key] for c in clients]
        return np.concatenate(parts).astype(dtype) if parts else np.empty(empty_shape, dtype)

    return AccountCohort(
        client_ids=ids, starts=_offsets([len(c["node_ids"]) for c in clients]),
        node_ids=cat("node_ids", np.int64, (0,)), features=cat("features", np.float32, (0, d)),
        y_bot=cat("y_bot", np.int64, (0,)), y_stance=cat("y_stance", np.int64, (0,)),
        split=cat("split", np.int8, (0,)), edge_starts=_offsets([c["edges"].shape[1] for c in clients]),
        edges=np.concatenate([c["edges"] for c in clients], axis=1).astype(np.int64) if clients
        else np.empty((2, 0), np.int64),
        edge_type=cat("edge_type", np.int64, (0,)), groups=groups,
    )


class MGTABBots(Workload, KnownClusters, DeviceFiles):
    name = "mgtab_bots"
    section = "mgtab"
    key_metric = "f1_bot"
    loss_name = "train_loss"
    higher_is_better = True
    summary_metrics = ("acc_bot", "f1_stance", "acc_stance", "selected_age")
    plot_metrics = ("f1_stance", "round_f1_bot")
    schema = {
        "source": ConfigField(str, "generator", "the graph: the seeded MGTAB-schema generator, or MGTAB's released "
                              "tensors under data_dir", choices=SOURCES),
        "data_dir": ConfigField(str, "", "folder of MGTAB's .pt files (source mgtab)"),
        "nodes": ConfigField(int, 2000, "generator: users", _at_least(20)),
        "communities": ConfigField(int, 8, "generator: planted communities", positive),
        "behaviour_groups": ConfigField(int, 1, "generator: groups of communities whose bots behave differently "
                                        "(the clusters of the k-model strategies)", positive),
        "text_dim": ConfigField(int, 32, "generator: width of the 'tweet' block (768 in MGTAB)", positive),
        "feature_shift": ConfigField(float, 0.5, "generator: the visible bots' shift of properties and text, in "
                                     "noise sds", non_negative),
        "stealth_share": ConfigField(float, 0.4, "generator: share of bots that look and follow like humans",
                                     _fraction),
        "homophily": ConfigField(float, 0.6, "generator: followers/friends share of same-label edges", _fraction),
        "in_community": ConfigField(float, 0.9, "generator: share of edges inside a community", _fraction),
        "degree_scale": ConfigField(float, 1.0, "generator: multiplies every relation's mean degree", positive),
        "partition": ConfigField(str, "community", "who holds which users: communities (planted, or Louvain on "
                                 "real files) or a random split", choices=PARTITIONS),
        "model": ConfigField(str, "rgcn", "the model", choices=MODELS),
        "relations": ConfigField(list, list(RELATIONS), "relations the graph models use", _relation_list),
        "hidden": ConfigField(int, 32, "hidden width", _at_least(4)),
        "weight_decay": ConfigField(float, 5e-4, "AdamW weight decay", non_negative),
        "stance_weight": ConfigField(float, 1.0, "weight of the stance head's loss", non_negative),
        "select_on": ConfigField(str, "mean", "validation macro-F1 the checkpoint is chosen on", choices=SELECT_ON),
        "baselines": ConfigField(list, ["fedavg-mlp", "fedavg-rgcn-best-pair", "centralised", "centralised-mlp"],
                                 "reference runs after the federation (in-process): " + ", ".join(BASELINES),
                                 _baseline_list),
    }

    # ---- scenario-level hooks -----------------------------------------------------------

    @classmethod
    def check_scenario(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        mg, fed = scenario[cls.section], scenario["federation"]
        problems = torch_train.check_device(scenario)
        if mg["model"] == "gat" and mg["hidden"] % 4:
            problems.append(("mgtab.hidden", f"{mg['hidden']} does not split over GAT's 4 heads"))
        if mg["source"] == "mgtab":
            if not mg["data_dir"]:
                return problems + [("mgtab.data_dir", "source 'mgtab' reads MGTAB's .pt files: name their folder")]
            if not Path(mg["data_dir"]).is_dir():
                return problems + [("mgtab.data_dir", f"{mg['data_dir']!r} is not a folder")]
        else:
            if mg["partition"] == "community" and mg["communities"] < fed["clients"]:
                return problems + [("mgtab.communities", f"{mg['communities']} communities cannot fill "
                                    f"{fed['clients']} clients (partition 'community')")]
            if mg["nodes"] < 10 * fed["clients"]:
                return problems + [("mgtab.nodes", f"{mg['nodes']} users are too few for {fed['clients']} clients "
                                    "(at least 10 each)")]
        try:
            graph = cls.load_graph(mg, fed["seed"])
        except GraphDataError as err:
            return problems + [("mgtab.data_dir", str(err))]
        try:
            parts = cls.split(mg, graph, fed["clients"], fed["seed"])
        except ValueError as err:
            return problems + [("federation.clients", str(err))]
        roles = cls.roles(graph, fed["seed"])
        empty = [c for c, p in enumerate(parts) if not (roles[p] == TRAIN).any()]
        if empty:
            problems.append(("federation.clients", f"client {empty[0]} holds no training user"))
        return problems

    @classmethod
    def check_phase1(cls, scenario: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        anchors, groups = scenario["anchors"]["count"], scenario[cls.section]["behaviour_groups"]
        if anchors < groups:
            return [("anchors.count", f"{anchors} anchors cannot cover {groups} behaviour groups: Phase 1 needs at "
                     "least one per group (anchors are clients 0..count-1, client c holds a community of group "
                     "c mod groups)")]
        return []

    @classmethod
    def baselines(cls, scenario: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """Reference runs by name (module docstring), all FedAvg."""
        mg = scenario[cls.section]
        whole = {"clients": 1, "cohort_size": 1, "participation": 1.0, "dropout": 0.0}
        pair = {"model": "rgcn", "relations": list(BEST_PAIR)}
        runs: dict[str, dict[str, dict[str, Any]]] = {
            f"fedavg-{m}": {"run": {"strategies": ["fedavg"]}, "mgtab": {"model": m}} for m in MODELS
        }
        runs["fedavg-rgcn-best-pair"] = {"run": {"strategies": ["fedavg"]}, "mgtab": pair}
        central = {"run": {"strategies": ["fedavg"]}, "federation": whole, "anchors": {"count": 0}}
        runs["centralised"] = {**central, "mgtab": {"partition": "random"}}
        for m in MODELS:
            runs[f"centralised-{m}"] = {**central, "mgtab": {"partition": "random", "model": m}}
        runs["centralised-rgcn-best-pair"] = {**central, "mgtab": {"partition": "random", **pair}}
        same = {f"fedavg-{mg['model']}", f"centralised-{mg['model']}"}  # the scenario's arm and `centralised`
        return {name: runs[name] for name in mg["baselines"] if name not in same}

    # ---- the graph and who holds it ------------------------------------------------------

    @staticmethod
    def load_graph(options: dict[str, Any], seed: int) -> AccountGraph:
        if options["source"] == "mgtab":
            return load_mgtab(options["data_dir"])
        return generate(GeneratorSettings.from_options(options), np.random.SeedSequence([seed, STREAM_GRAPH]))

    @staticmethod
    def roles(graph: AccountGraph, seed: int) -> np.ndarray:
        return split_nodes(graph.num_nodes, np.random.SeedSequence([seed, STREAM_SPLIT]))

    @staticmethod
    def split(options: dict[str, Any], graph: AccountGraph, clients: int, seed: int) -> list[np.ndarray]:
        return partition(graph, clients, options["partition"], np.random.SeedSequence([seed, STREAM_PARTITION]),
                         louvain_seed=seed)

    def __init__(self, scenario: dict[str, dict[str, Any]]) -> None:
        self.torch_device = torch_train.select_device(scenario)  # on the CPU: one thread
        super().__init__(scenario)
        self.options = dict(scenario[self.section])
        self.model_name = str(self.options["model"])
        self.relations = [RELATIONS.index(r) for r in self.options["relations"]]
        self.hidden = int(self.options["hidden"])
        self.stance_weight = float(self.options["stance_weight"])
        self._model: torch.nn.Module | None = None
        self._graphs: dict[tuple, Graph] = {}
        self._selection: dict[str, Any] = {"age": None}

    @cached_property
    def graph(self) -> AccountGraph:
        return self.load_graph(self.options, self.seed)

    @cached_property
    def split_of(self) -> np.ndarray:
        return self.roles(self.graph, self.seed)

    @cached_property
    def parts(self) -> list[np.ndarray]:
        return self.split(self.options, self.graph, self.num_clients, self.seed)

    @property
    def feature_dim(self) -> int:
        return int(self.graph.features.shape[1])

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = build_model(self.model_name, self.feature_dim, self.hidden, len(self.relations))
        return self._model

    # ---- clusters -------------------------------------------------------------------------

    @property
    def num_clusters(self) -> int:
        return int(self.options["behaviour_groups"])

    @property
    def groups_known(self) -> bool:
        """One planted community per client: a client's true cluster is its community's group."""
        return (self.options["source"] == "generator" and self.options["partition"] == "community"
                and int(self.options["communities"]) == self.num_clients)

    def true_clusters(self, data: AccountCohort) -> np.ndarray | None:
        return data.groups

    # ---- the core: data -------------------------------------------------------------------

    def client_data(self, client_ids: np.ndarray) -> AccountCohort:
        ids = np.asarray(client_ids, dtype=np.int64)
        g, clients = self.graph, []
        for c in ids:
            nodes = self.parts[int(c)]
            edges, types = subgraph_edges(g, nodes)
            clients.append({"node_ids": nodes, "features": g.features[nodes], "y_bot": g.y_bot[nodes],
                            "y_stance": g.y_stance[nodes], "split": self.split_of[nodes], "edges": edges,
                            "edge_type": types})
        groups = None
        if self.groups_known and g.group is not None:
            groups = np.array([int(g.group[g.community[self.parts[int(c)][0]]]) for c in ids], np.int64)
        return _pack(ids, clients, self.feature_dim, groups)

    def subset(self, data: AccountCohort, index: np.ndarray) -> AccountCohort:
        index = np.asarray(index, dtype=np.int64)
        clients = []
        for j in index:
            r, e = data.rows(int(j)), data.edge_rows(int(j))
            clients.append({"node_ids": data.node_ids[r], "features": data.features[r], "y_bot": data.y_bot[r],
                            "y_stance": data.y_stance[r], "split": data.split[r], "edges": data.edges[:, e],
                            "edge_type": data.edge_type[e]})
        return _pack(data.client_ids[index], clients, data.features.shape[1],
                     None if data.groups is None else data.groups[index])

    device_format = device.FORMAT

    def device_files(self, data: AccountCohort) -> list[tuple[int, dict[str, np.ndarray]]]:
        return device.device_files(data)

    def read_device_files(self, files: list[Any]) -> AccountCohort:
        clients = device.read_device_files(files, self.num_clients, self.feature_dim, self.graph.num_nodes)
        return _pack(np.array([int(c["client_id"]) for c in clients], np.int64), clients, self.feature_dim, None)

    @cached_property
    def federation_data(self) -> AccountCohort:
        """Every client's subgraph, for the server's evaluator (simulation only)."""
        return self.client_data(np.arange(self.num_clients))

    def client_graph(self, data: AccountCohort, j: int) -> Graph:
        """Client j's adjacencies (built once per client and content)."""
        r, e = data.rows(j), data.edge_rows(j)
        key = (int(data.client_ids[j]), r.stop - r.start, e.stop - e.start, int(data.node_ids[r][:1].sum()))
        if key not in self._graphs:
            self._graphs[key] = build_graph(r.stop - r.start, data.edges[:, e], data.edge_type[e], self.relations)
        return self._graphs[key]

    def tensors(self, data: AccountCohort, j: int) -> tuple[torch.Tensor, ...]:
        r = data.rows(j)
        train = np.flatnonzero(data.split[r] == TRAIN)
        return (torch.as_tensor(np.array(data.features[r])), torch.as_tensor(np.array(data.y_bot[r])),
                torch.as_tensor(np.array(data.y_stance[r])), torch.as_tensor(train))

    # ---- the model ------------------------------------------------------------------------

    def _draw(self, seed: int, j: int) -> Params:
        torch.manual_seed(int(np.random.SeedSequence([seed, STREAM_INIT, j]).generate_state(1)[0]))
        net = build_model(self.model_name, self.feature_dim, self.hidden, len(self.relations))
        return {**torch_train.get_params(net), AGE: np.zeros(1, np.float32)}

    def initial_parameters(self) -> Params:
        return self._draw(self.seed, 0)

    def random_models(self, k: int, seed: int) -> Params:
        """k independent draws of the model's own initialisation, stacked (IFCA's start)."""
        draws = [self._draw(seed, j) for j in range(k)]
        return {n: np.stack([d[n] for d in draws]) for n in draws[0]}

    def _load(self, params: Params) -> torch.nn.Module:
        net = torch_train.set_params(self.model, {n: v for n, v in params.items() if n != AGE})
        net.eval()
        return net

    def local_loss(self, params: Params, data: AccountCohort) -> np.ndarray:
        """Each client's joint training loss (its training users) under ``params``."""
        net = self._load(params)
        out = np.zeros(len(data.client_ids))
        with torch.no_grad():
            for j in range(len(data.client_ids)):
                x, y_bot, y_stance, train = self.tensors(data, j)
                bot, stance = net(x, self.client_graph(data, j))
                out[j] = float(joint_loss(bot[train], stance[train], y_bot[train], y_stance[train],
                                          self.stance_weight))
        return out

    def local_train(self, start: Params, data: AccountCohort, settings: TrainSettings) -> Params:
        """``local_steps`` full-batch AdamW epochs per client on its training users (dropout
        seeded by seed, client and round); ``age`` + 1."""
        optimizer = partial(torch.optim.AdamW, lr=settings.lr, weight_decay=float(self.options["weight_decay"]))

        def train(j: int, model: torch.nn.Module) -> None:
            x, y_bot, y_stance, idx = self.tensors(data, j)
            graph = self.client_graph(data, j)
            torch.manual_seed(int(np.random.SeedSequence(
                [self.seed, STREAM_TRAIN, int(data.client_ids[j]), settings.server_round]).generate_state(1)[0]))

            def objective(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
                bot, stance = model(x, graph)
                return joint_loss(bot[idx], stance[idx], y_bot[idx], y_stance[idx], self.stance_weight)

            torch_train.train_steps(model, objective, torch_train.minibatches((x,), torch_train.full_batch()),
                                    steps=settings.local_steps, optimizer=optimizer,
                                    proximal_mu=settings.proximal_mu)

        weights = {n: v for n, v in start.items() if n != AGE}
        out = torch_train.train_clients(self.model, weights, train)
        out[AGE] = (np.asarray(start[AGE], np.float32) + 1).reshape(-1, 1)
        return out

    # ---- server-side metrics ----------------------------------------------------------------

    def predictions(self, models: Params, data: AccountCohort) -> tuple[np.ndarray, np.ndarray]:
        """Every user's predicted bot and stance class, each client with the model of least
        training loss (its own choice) when there are several."""
        k = len(models[AGE])
        one = [{n: v[i] for n, v in models.items()} for i in range(k)]
        choice = np.zeros(len(data.client_ids), np.int64)
        if k > 1:
            choice = np.argmin(np.stack([self.local_loss(m, data) for m in one], axis=1), axis=1)
        bot, stance = np.empty(len(data.node_ids), np.int64), np.empty(len(data.node_ids), np.int64)
        for i in np.unique(choice):
            net = self._load(one[int(i)])
            with torch.no_grad():
                for j in np.flatnonzero(choice == i):
                    x = self.tensors(data, int(j))[0]
                    b, s = net(x, self.client_graph(data, int(j)))
                    bot[data.rows(int(j))], stance[data.rows(int(j))] = b.argmax(1).numpy(), s.argmax(1).numpy()
        return bot, stance

    def evaluate(self, models: Params) -> dict[str, float]:
        """The models' validation (``val_*``) and test scores over every client's users."""
        data = self.federation_data
        bot, stance = self.predictions(models, data)
        val, test = data.split == VAL, data.split == TEST
        return {**scores(data.y_bot[test], data.y_stance[test], bot[test], stance[test]),
                **scores(data.y_bot[val], data.y_stance[val], bot[val], stance[val], "val_")}

    def central_metrics(self, models: Params, confusion: np.ndarray | None = None) -> dict[str, float]:
        """The round's scores (``round_*`` test, ``val_*``) and the test scores of the
        checkpoint with the best validation macro-F1 so far in this arm (module docstring)."""
        if confusion is not None:  # the clients' choices: ARI comes from the platform
            return {}
        now = self.evaluate(models)
        age = float(np.max(models[AGE]))
        sel = self._selection
        if sel["age"] is None or age < sel["age"] or age == 0:  # a new arm (or its untrained start)
            sel.update(score=-np.inf, metrics=None, best_age=None)
        sel["age"] = age
        score = selection_score(now, str(self.options["select_on"]))
        if age > 0 and score > sel["score"]:
            sel.update(score=score, metrics={m: now[m] for m in METRICS}, best_age=age)
        chosen = sel["metrics"] or {m: now[m] for m in METRICS}
        out = {**chosen, "selected_age": sel["best_age"] if sel["best_age"] is not None else age,
               "val_score": score}
        out.update({f"round_{m}": now[m] for m in METRICS})
        out.update({k: v for k, v in now.items() if k.startswith("val_")})
        return out
