"""Multi-relational account graphs with MGTAB's schema: a seeded generator, the released
files' reader, the node split and who holds which nodes.

Schema (as MGTAB, Shi et al. 2023): ``x`` is (N, 20 + E): 10 numeric properties (log-count
like, min-max scaled to [0, 1]), 10 binary profile flags, then E "tweet" dimensions (768 in
the release, a language model's embedding; ``text_dim`` here). Seven relation types,
``edge_type`` 0..6 in the order of ``RELATIONS``. Two labels per user: bot (0 human, 1 bot)
and stance (0 neutral, 1 against, 2 support).

**The generator** (``generate``). Users fall into ``communities`` planted communities (a share
``in_community`` of every relation's edges stays inside one) and each community into one of
``behaviour_groups`` groups (community c is in group c mod G). 27% of users are bots; stance
shares are about 0.37 / 0.36 / 0.27, bots leaning "against". Node activity is lognormal and
edge ends are drawn in proportion to it (popular accounts). A share ``stealth_share`` of
the bots are *stealth* bots: their properties look human and they follow and befriend
like humans; only their co-URL and mention / reply behaviour gives them away. Each relation
has its own character (edges made undirected; mean degrees per user in brackets):

| relation | character |
| --- | --- |
| followers (6) | homophilous on the *visible* bot label (a non-stealth bot with share ``homophily``) |
| friends (8) | the same, plus stance-homophilous (share 0.3) |
| mention (3) | bots (stealth included) mention 3x as often, and a bot's target is a human with share 0.85 |
| reply (3) | the same, share 0.8 |
| quoted (2) | noise: no label structure |
| url (2) | bot campaigns: bots (stealth included) post 4x as often and co-post with bots (share 0.85) |
| hashtag (3) | stance-homophilous (share 0.6) |

So followers + friends (the best pair alone) see only the visible bots, and the stealth bots
are learnable only from the other relations: by construction, a model on all seven can
beat the best pair, and ``relation_homophily`` measures it. In odd behaviour groups (G > 1)
bots behave otherwise: the visible bots' shift of properties, flags and text has the
opposite sign (e.g. fewer statuses, not more), and the url and hashtag relations swap
characters (edges starting in such a community: bots coordinate through hashtags, stance
shows in shared URLs). These are the hidden groups of the clustered strategies.

**Real files** (``load_mgtab``): MGTAB's release, ``features.pt``, ``labels_bot.pt``,
``labels_stance.pt``, ``edge_index.pt``, ``edge_type.pt``, ``edge_weight.pt`` (torch
tensors) in one folder. Edge weights are read and checked but not used (every model here
aggregates unweighted neighbours). Real data have no planted communities: the
``community`` partition then uses Louvain communities of the merged graph (networkx).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

RELATIONS = ("followers", "friends", "mention", "reply", "quoted", "url", "hashtag")
BEST_PAIR = ("followers", "friends")  # the generator's two most informative relations alone
NUMERIC, FLAGS = 10, 10
PROPERTY_DIM = NUMERIC + FLAGS
STANCES = ("neutral", "against", "support")
BOT_SHARE = 0.27
# stance shares of bots and humans: overall about (0.37, 0.36, 0.27), bots leaning "against"
STANCE_BOT = np.array([0.25, 0.55, 0.20])
STANCE_HUMAN = (np.array([0.37, 0.36, 0.27]) - BOT_SHARE * STANCE_BOT) / (1 - BOT_SHARE)
SPLIT_SHARES = (0.7, 0.2, 0.1)  # train / validation / test, as MGTAB
TRAIN, VAL, TEST = 0, 1, 2
FILES = ("features.pt", "labels_bot.pt", "labels_stance.pt", "edge_index.pt", "edge_type.pt", "edge_weight.pt")


class GraphDataError(ValueError):
    """A graph file that cannot be read as MGTAB's format; the message names it."""


@dataclass(frozen=True)
class AccountGraph:
    """One multi-relational graph (MGTAB's tensors, as numpy)."""

    features: np.ndarray  # (N, 20 + E) float32
    edge_index: np.ndarray  # (2, M) int64, each undirected edge once per relation
    edge_type: np.ndarray  # (M,) int64 in 0..6
    y_bot: np.ndarray  # (N,) int64
    y_stance: np.ndarray  # (N,) int64
    community: np.ndarray | None = None  # (N,) planted community (generator only)
    group: np.ndarray | None = None  # (communities,) behaviour group of each community (generator only)
    stealth: np.ndarray | None = None  # (N,) bool: bots that look and follow like humans (generator only)

    @property
    def num_nodes(self) -> int:
        return len(self.y_bot)


@dataclass(frozen=True, kw_only=True)  # built from the scenario's [mgtab] table: keywords only
class GeneratorSettings:
    nodes: int = 2000
    communities: int = 8
    behaviour_groups: int = 1
    text_dim: int = 32
    feature_shift: float = 0.5  # the bots' shift of their properties and text, in noise sds
    stealth_share: float = 0.4
    homophily: float = 0.6  # followers / friends: share of edges to a user of the same visible label
    in_community: float = 0.9
    degree_scale: float = 1.0  # multiplies every relation's mean degree

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GeneratorSettings:
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


# relation -> (mean degree, source weight of bots, rule, share)
SIGNATURES: dict[str, tuple[float, float, str, float]] = {
    "followers": (6.0, 1.0, "visible-bot", -1.0),  # share: the settings' homophily
    "friends": (8.0, 1.0, "visible-bot+stance", -1.0),
    "mention": (3.0, 3.0, "bot-to-human", 0.85),
    "reply": (3.0, 3.0, "bot-to-human", 0.80),
    "quoted": (2.0, 1.0, "noise", 0.0),
    "url": (2.0, 4.0, "bot-to-bot", 0.85),
    "hashtag": (3.0, 1.0, "stance", 0.6),
}


# odd behaviour groups: bots coordinate through hashtags, and stance shows in shared URLs
SWAPPED = {"url": "hashtag", "hashtag": "url"}


def _draw(rng: np.random.Generator, activity: np.ndarray, community: np.ndarray, label: np.ndarray,
          want_community: np.ndarray, want_label: np.ndarray) -> np.ndarray:
    """For each edge e, a user drawn in proportion to activity among those of community
    ``want_community[e]`` and label ``want_label[e]`` (-1: any)."""
    out = np.empty(len(want_label), np.int64)
    for c in np.unique(want_community):
        for y in np.unique(want_label[want_community == c]):
            rows = np.flatnonzero((want_community == c) & (want_label == y))
            mask = np.ones(len(activity), bool)
            if c >= 0:
                mask &= community == c
            if y >= 0:
                mask &= label == y
            nodes = np.flatnonzero(mask)
            if len(nodes) == 0:  # no such user in the community: anyone in it
                nodes = np.flatnonzero(community == c) if c >= 0 else np.arange(len(activity))
            cumulative = np.cumsum(activity[nodes])
            pick = np.searchsorted(cumulative, rng.random(len(rows)) * cumulative[-1], side="right")
            out[rows] = nodes[np.minimum(pick, len(nodes) - 1)]
    return out


def _relation_edges(rng: np.random.Generator, settings: GeneratorSettings, relation: str, bot: np.ndarray,
                    visible: np.ndarray, stance: np.ndarray, community: np.ndarray,
                    activity: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(2, m) distinct undirected edges of one relation, each once (sources drawn by activity,
    bots weighted by the relation's rate; targets by the relation's rule, in the source's
    community with share ``in_community``), from the users ``sources`` may start."""
    degree, bot_weight, rule, share = SIGNATURES[relation]
    n = len(bot)
    m = int(round(degree * settings.degree_scale * int(sources.sum()) / 2))
    weight = activity * np.where(bot, bot_weight, 1.0) * sources
    src = rng.choice(n, size=m, p=weight / weight.sum())
    comm = np.where(rng.random(m) < settings.in_community, community[src], -1)
    roll = rng.random(m)
    dst = np.empty(m, np.int64)
    if rule.startswith("visible-bot"):
        h = settings.homophily
        same = roll < h
        by_stance = (~same & (roll < h + 0.3 * (1 - h))) if rule.endswith("+stance") else np.zeros(m, bool)
        rest = ~by_stance
        dst[rest] = _draw(rng, activity, community, visible.astype(np.int64), comm[rest],
                          np.where(same, visible[src].astype(np.int64), -1)[rest])
        dst[by_stance] = _draw(rng, activity, community, stance, comm[by_stance], stance[src][by_stance])
    elif rule in ("bot-to-human", "bot-to-bot"):
        target = 0 if rule == "bot-to-human" else 1
        dst[:] = _draw(rng, activity, community, bot.astype(np.int64), comm,
                       np.where(bot[src] & (roll < share), target, -1))
    elif rule == "stance":
        dst[:] = _draw(rng, activity, community, stance, comm, np.where(roll < share, stance[src], -1))
    else:  # noise
        dst[:] = _draw(rng, activity, community, stance, comm, np.full(m, -1))
    keep = src != dst
    return np.sort(np.stack([src[keep], dst[keep]]), axis=0)


def generate(settings: GeneratorSettings, seed: int | np.random.SeedSequence = 0) -> AccountGraph:
    """A seeded MGTAB-schema graph (module docstring)."""
    s = settings
    rng = np.random.default_rng(seed)
    n = s.nodes
    community = rng.permutation(np.arange(n) % s.communities)
    group_of = np.arange(s.communities) % max(s.behaviour_groups, 1)
    group = group_of[community]
    bot = rng.random(n) < BOT_SHARE
    u = rng.random(n)
    stance = np.where(bot, np.searchsorted(np.cumsum(STANCE_BOT), u), np.searchsorted(np.cumsum(STANCE_HUMAN), u))
    stance = np.minimum(stance, 2).astype(np.int64)
    stealth = bot & (rng.random(n) < s.stealth_share)
    visible = bot & ~stealth
    activity = rng.lognormal(0.0, 1.0, n)

    # properties: a fixed bot direction; odd behaviour groups flip it (their bots deviate the other way)
    shift = s.feature_shift
    numeric_dir = np.array([1, 1, -1, -1, 1, 0, 0, 1, -1, 0], float)
    flag_dir = np.array([1, 1, 0, -1, 0, 1, 0, 0, -1, 0], float)
    sign = np.where(group % 2 == 1, -1.0, 1.0)
    numeric = rng.standard_normal((n, NUMERIC)) + np.log(activity)[:, None] * 0.3
    numeric += (visible * sign * shift)[:, None] * numeric_dir
    numeric = (numeric - numeric.min(0)) / np.maximum(numeric.max(0) - numeric.min(0), 1e-9)
    logits = -0.5 + 2.0 * (visible * sign * shift)[:, None] * flag_dir
    flags = (rng.random((n, FLAGS)) < 1 / (1 + np.exp(-logits))).astype(float)
    # text: isotropic noise plus low-rank class means (bots on 4 dims, each stance on 4 dims)
    text = rng.standard_normal((n, s.text_dim))
    k = min(4, s.text_dim)
    bot_mean = np.zeros(s.text_dim)
    bot_mean[:k] = shift
    stance_means = np.zeros((3, s.text_dim))
    for c in range(3):
        cols = (np.arange(k) + 4 * (c + 1)) % s.text_dim
        stance_means[c, cols] = shift
    text += (visible * sign)[:, None] * bot_mean + stance_means[stance]
    features = np.concatenate([numeric, flags, text], axis=1).astype(np.float32)

    edges, types = [], []
    odd = group % 2 == 1
    for r, relation in enumerate(RELATIONS):
        parts = [_relation_edges(rng, s, relation, bot, visible, stance, community, activity, ~odd)]
        if odd.any():  # odd groups: the relation behaves as its swapped partner
            parts.append(_relation_edges(rng, s, SWAPPED.get(relation, relation), bot, visible, stance, community,
                                         activity, odd))
        e = np.unique(np.concatenate(parts, axis=1), axis=1)
        edges.append(e)
        types.append(np.full(e.shape[1], r, np.int64))
    return AccountGraph(features=features, edge_index=np.concatenate(edges, axis=1).astype(np.int64),
                        edge_type=np.concatenate(types), y_bot=bot.astype(np.int64), y_stance=stance,
                        community=community.astype(np.int64), group=group_of.astype(np.int64),
                        stealth=stealth)


def relation_homophily(graph: AccountGraph, nodes: np.ndarray) -> dict[str, float]:
    """Per relation, the share of bot neighbours among the edges at ``nodes`` (each edge
    seen from both ends): how much a relation says about whether these users are bots."""
    out = {}
    mask = np.zeros(graph.num_nodes, bool)
    mask[nodes] = True
    for r, relation in enumerate(RELATIONS):
        e = graph.edge_index[:, graph.edge_type == r]
        a = np.concatenate([e[0], e[1]])
        b = np.concatenate([e[1], e[0]])
        at = mask[a]
        out[relation] = float(graph.y_bot[b[at]].mean()) if at.any() else float("nan")
    return out


# ---- the split and who holds which nodes ------------------------------------------------------


def split_nodes(n: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """(n,) 0 train / 1 validation / 2 test: a seeded shuffle cut 70 / 20 / 10 (MGTAB's split)."""
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, TEST, np.int8)
    train_end, val_end = round(SPLIT_SHARES[0] * n), round((SPLIT_SHARES[0] + SPLIT_SHARES[1]) * n)
    split[order[:train_end]] = TRAIN
    split[order[train_end:val_end]] = VAL
    return split


def louvain_communities(graph: AccountGraph, seed: int) -> np.ndarray:
    """(N,) community of each user: Louvain on the merged, undirected graph (networkx)."""
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(graph.num_nodes))
    g.add_edges_from(graph.edge_index.T.tolist())
    out = np.empty(graph.num_nodes, np.int64)
    for c, members in enumerate(nx.community.louvain_communities(g, seed=seed)):
        out[list(members)] = c
    return out


def partition(graph: AccountGraph, clients: int, scheme: str, seed: int | np.random.SeedSequence,
              louvain_seed: int = 0) -> list[np.ndarray]:
    """Each client's nodes (sorted). ``community``: the planted communities, one per client
    when their number equals ``clients`` (else packed, largest first, onto the client with
    the fewest nodes); real data: Louvain communities packed the same way. ``random``: a
    seeded even split."""
    n = graph.num_nodes
    if clients > n:
        raise ValueError(f"{clients} clients for {n} users")
    if scheme == "random":
        order = np.random.default_rng(seed).permutation(n)
        return [np.sort(p) for p in np.array_split(order, clients)]
    if scheme != "community":
        raise ValueError(f"unknown partition {scheme!r}; expected 'community' or 'random'")
    community = graph.community if graph.community is not None else louvain_communities(graph, louvain_seed)
    labels, sizes = np.unique(community, return_counts=True)
    if len(labels) == clients:
        return [np.flatnonzero(community == c) for c in labels]
    if len(labels) < clients:
        raise ValueError(f"{len(labels)} communities cannot fill {clients} clients")
    load = np.zeros(clients, np.int64)
    owner = {}
    for c in labels[np.argsort(-sizes, kind="stable")]:
        j = int(np.argmin(load))
        owner[int(c)] = j
        load[j] += int(sizes[labels == c][0])
    client_of = np.array([owner[int(c)] for c in community])
    return [np.flatnonzero(client_of == j) for j in range(clients)]


def subgraph_edges(graph: AccountGraph, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The edges among ``nodes`` (local indices into ``nodes``) and their types."""
    local = np.full(graph.num_nodes, -1, np.int64)
    local[nodes] = np.arange(len(nodes))
    ends = local[graph.edge_index]
    keep = (ends >= 0).all(axis=0)
    return ends[:, keep], graph.edge_type[keep]


# ---- MGTAB's released files -------------------------------------------------------------------


def _tensor(path: Path) -> np.ndarray:
    import torch

    if not path.is_file():
        raise GraphDataError(f"{path}: missing (MGTAB's release has {', '.join(FILES)})")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise GraphDataError(f"{path}: not a readable torch tensor file: {err}") from None
    if not isinstance(value, torch.Tensor):
        raise GraphDataError(f"{path}: holds {type(value).__name__}; expected a torch tensor")
    return value.detach().cpu().numpy()


def load_mgtab(root: str | Path) -> AccountGraph:
    """MGTAB's released tensors from ``root`` (module docstring); a bad file is named."""
    root = Path(root)
    x = _tensor(root / "features.pt")
    if x.ndim != 2 or x.shape[1] <= PROPERTY_DIM or not np.issubdtype(x.dtype, np.floating):
        raise GraphDataError(f"{root / 'features.pt'}: shape {x.shape} of {x.dtype}; expected (N, 20 + E) floats")
    if not np.isfinite(x).all():
        raise GraphDataError(f"{root / 'features.pt'}: holds NaN or infinite values")
    n = len(x)
    labels = {}
    for name, classes in (("labels_bot.pt", 2), ("labels_stance.pt", 3)):
        y = _tensor(root / name)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
            raise GraphDataError(f"{root / name}: expected ({n},) integer classes 0-{classes - 1}, got shape "
                                 f"{y.shape} of {y.dtype}")
        labels[name] = y.astype(np.int64)
    edge_index = _tensor(root / "edge_index.pt")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2 or not np.issubdtype(edge_index.dtype, np.integer):
        raise GraphDataError(f"{root / 'edge_index.pt'}: shape {edge_index.shape} of {edge_index.dtype}; "
                             "expected (2, M) integers")
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise GraphDataError(f"{root / 'edge_index.pt'}: node ids must lie in 0..{n - 1}")
    m = edge_index.shape[1]
    edge_type = _tensor(root / "edge_type.pt")
    if edge_type.shape != (m,) or not np.issubdtype(edge_type.dtype, np.integer) or (
            m and (edge_type.min() < 0 or edge_type.max() >= len(RELATIONS))):
        raise GraphDataError(f"{root / 'edge_type.pt'}: expected ({m},) relation types 0-{len(RELATIONS) - 1}")
    weight = _tensor(root / "edge_weight.pt")
    if weight.shape != (m,) or not np.isfinite(weight.astype(np.float64)).all():
        raise GraphDataError(f"{root / 'edge_weight.pt'}: expected ({m},) finite weights")
    keep = edge_index[0] != edge_index[1]
    ends = np.sort(edge_index[:, keep], axis=0)  # undirected, each once per relation
    stacked = np.unique(np.concatenate([ends, edge_type[keep][None]]), axis=1)
    return AccountGraph(features=x.astype(np.float32), edge_index=stacked[:2].astype(np.int64),
                        edge_type=stacked[2].astype(np.int64), y_bot=labels["labels_bot.pt"],
                        y_stance=labels["labels_stance.pt"])
