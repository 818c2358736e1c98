"""The run configuration (a scenario): its keys, defaults, and validation at the boundary.

A scenario is a dict of sections (TOML tables). ``resolve`` checks every key against the
schema, fills defaults and returns the complete scenario, or raises ``ScenarioError`` listing
every problem with its dotted field name and what was expected. The workload named in
``run.workload`` contributes its own section and cross-field checks.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from proto.wire import ANCHOR_TRAIN
from strategies import CLUSTER_RULES, K_MODEL, PHASE1, SINGLE_MODEL, STRATEGIES, catalog, runs_phase1
from strategies.robust import ROBUST
from workloads import WORKLOADS, workload_class
from workloads.base import (
    REQUIRED, CoarseStatistics, ConfigField, DeviceFiles, NormalEquations, TrainsOnUploads, Workload, non_negative,
    positive,
)
from workloads.device_files import client_files, truth_path
from workloads.federation import AVAILABILITY_TRACES, SIZE_LAWS
from workloads.federation import ATTACK_DEFAULTS as ATTACKS
from workloads.federation import PARTICIPATION_DEFAULTS as DEFAULTS


def _strategy_list(v: list) -> str | None:
    if not v:
        return "must name at least one strategy"
    if not all(isinstance(label, str) and label for label in v):
        return "expected strategy labels (strings)"
    if len(set(v)) != len(v):
        return "a label appears twice; give the second its own [strategy.<label>] table"
    return None  # each label's strategy and settings: catalog.check_label, in the cross-checks


MAX_INT = 2**63  # every integer field fits an int64 (numpy seeds, the monitor's fields)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _run_name(v: str) -> str | None:
    """A plain folder name: the run directory is ``<out>/<name>-<time>``, never elsewhere."""
    if RUN_NAME.fullmatch(v):
        return None
    return ("must be a plain name: letters, digits and . _ + - (no / or spaces, not starting "
            "with a dot), at most 100 characters")


def _aggregate_rule(v: str) -> str | None:
    if v in CLUSTER_RULES or catalog.is_import_path(v):
        return None
    return f"expected one of {list(CLUSTER_RULES)} or an import path package.module:function"


LR_SCHEDULES = ("constant", "cosine")
INITS = ("random", "zeros", "true-first", "truth", "bernoulli")
REFINEMENTS = ("first-order", "second-order")
TRAIN_OVERRIDES = ("lr", "local_steps", "step_cap", "lr_schedule")  # per label, any own strategy


def _client_ids(v: list) -> str | None:
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return "expected non-negative client ids (integers)"
    return "names a client twice" if len(set(v)) != len(v) else None


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _probability(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _hours(v: float) -> str | None:
    return None if 0 < v <= 24 else "must be in (0, 24]"


def _above_one(v: float) -> str | None:
    return None if v > 1 else "must be > 1 (a Zipf law needs an exponent above one)"


def _trim(v: float) -> str | None:
    return None if 0 <= v < 0.5 else "must be in [0, 0.5)"


CORE_SCHEMA: dict[str, dict[str, ConfigField]] = {
    "run": {
        "name": ConfigField(str, "scenario", "name of the run (the run directory's prefix)", _run_name),
        "workload": ConfigField(str, "mixed_regression", "client workload: " + ", ".join(WORKLOADS)
                                + ", or your own as package.module:Class"),
        "rounds": ConfigField(int, 20, "rounds per strategy", positive),
        "strategies": ConfigField(
            list, ["fedavg", "fedprox"], "strategies, run one after another", _strategy_list
        ),
        "out": ConfigField(str, "runs", "folder that receives the run directory"),
        "round_timeout": ConfigField(float, 600.0, "seconds to wait for a round's replies", positive),
        "monitor": ConfigField(
            str, "127.0.0.1:0", "where the ServerApp serves its live monitor (host:port; port 0: "
            "any free port, written to the run record's monitor.address; empty: off)",
        ),
        "expected_peak_gib": ConfigField(
            float, 0.0, "the run's stated peak memory, all processes (GiB; 0: the workload's "
            "estimate); the launcher warns when it exceeds the machine's available memory",
            non_negative,
        ),
        "num_gpus": ConfigField(
            float, 0.0, "GPUs per Ray actor (a fraction shares one GPU); > 0: torch workloads train "
            "on CUDA, 0: on the CPU with one thread", non_negative,
        ),
        "tracking": ConfigField(str, "none", "also log the run to an experiment tracker: none or mlflow "
                                "(pip install 'umbel[tracking]')", choices=("none", "mlflow")),
        "tracking_uri": ConfigField(str, "", "the tracker's store or server (mlflow: a tracking URI; "
                                    "empty: a local store in run.out's mlruns/)"),
    },
    "federation": {
        "clients": ConfigField(int, REQUIRED, "number of (virtual) clients", positive),
        "size_law": ConfigField(str, "zipf", "law of local dataset sizes", choices=SIZE_LAWS),
        "zipf_exponent": ConfigField(float, 1.6, "exponent of the zipf size law", _above_one),
        "min_size": ConfigField(int, 1, "smallest local dataset", positive),
        "max_size": ConfigField(int, 200, "largest local dataset", positive),
        "single_point_fraction": ConfigField(
            float, 0.0, "share of (non-anchor) clients forced to hold one point", _probability
        ),
        "cohort_size": ConfigField(int, 100, "most virtual clients hosted by one node", positive),
        "seed": ConfigField(int, 0, "seed of every random draw", non_negative),
        "participation": ConfigField(
            float, DEFAULTS["participation"], "fraction of clients sampled each round", _fraction
        ),
        "dropout": ConfigField(
            float, DEFAULTS["dropout"], "probability that a sampled client fails to reply", _probability
        ),
        "availability": ConfigField(
            str, DEFAULTS["availability"], "availability trace: always, bernoulli (per round) or diurnal (daily window)",
            choices=AVAILABILITY_TRACES,
        ),
        "availability_probability": ConfigField(
            float, DEFAULTS["availability_probability"], "bernoulli trace: probability that a client is online in a round", _fraction
        ),
        "online_hours": ConfigField(float, DEFAULTS["online_hours"], "diurnal trace: hours a day a client is online", _hours),
        "hours_per_round": ConfigField(float, DEFAULTS["hours_per_round"], "diurnal trace: simulated hours per round", positive),
        "deadline_s": ConfigField(
            float, DEFAULTS["deadline_s"], "per-round deadline in simulated seconds; later replies are dropped and "
            "counted (0: none)", non_negative,
        ),
        "latency_median_s": ConfigField(float, DEFAULTS["latency_median_s"], "median simulated client latency (seconds)", positive),
        "latency_sigma": ConfigField(float, DEFAULTS["latency_sigma"], "log-normal spread of client latency", non_negative),
        "scaled_update_fraction": ConfigField(
            float, ATTACKS["scaled_update_fraction"], "share of clients (fixed by the seed) that multiply "
            "their update by scaled_update_factor: simulated model poisoning", _probability,
        ),
        "scaled_update_factor": ConfigField(
            float, ATTACKS["scaled_update_factor"], "what those clients multiply their update (new - sent) by",
        ),
    },
    "anchors": {
        "count": ConfigField(int, 0, "anchor clients: ids 0..count-1 (choice = first) or a seeded "
                             "random draw of that many (choice = random)", non_negative),
        "choice": ConfigField(str, "first", "which clients are anchors when ids is empty",
                              choices=("first", "random")),
        "ids": ConfigField(list, [], "explicit anchor client ids (overrides count and choice)", _client_ids),
        "size": ConfigField(int, 65, "points held by each anchor client (generated federations)", positive),
    },
    "data": {
        "folder": ConfigField(str, "", "a folder of client files in the workload's device format, one per "
                              "client (ids 0..clients-1), used instead of generated data; empty: generated"),
        "truth": ConfigField(str, "", "optional ground-truth file (relative to data.folder when there is one) "
                             "that enables the truth-based metrics of a data folder or a deployment; empty: none "
                             "are recorded (a generated federation knows its own)"),
        "deployed": ConfigField(bool, False, "set by `umbel deploy run`: the clients' data are their devices' "
                                "files, so only data.truth can give truth-based metrics"),
    },
    "clustered": {
        "init": ConfigField(
            str, "random", "initial k models handed to the k-model strategies (bernoulli: "
            "init_scale x Bernoulli(1/2) coordinates, IFCA's starts)",
            choices=INITS,
        ),
        "init_scale": ConfigField(float, 1.0, "scale of the bernoulli initial models", positive),
        "refine": ConfigField(
            str, "first-order", "Phase 2's model update: first-order (clients train, the server "
            "averages) or second-order (clients send per-cluster normal equations, the server solves "
            "each cluster's least squares; workloads with NormalEquations)",
            choices=REFINEMENTS,
        ),
        "assignment": ConfigField(
            str, "hard", "second-order: each client in the one cluster it picks (hard, the paper's "
            "alternation) or in every cluster by its posterior weight under a Gaussian noise model (soft: "
            "one EM step a round on the server, from per-client replies; closer to maximum likelihood "
            "when many clients hold one or two points)", choices=("hard", "soft"),
        ),
        "ridge": ConfigField(float, 1e-6, "second-order: ridge weight towards the cluster's previous model, "
                             "relative to the mean normal matrix", non_negative),
        "update": ConfigField(
            str, "mean", "how a cluster's model moves: mean (example-weighted mean of its clients' models) "
            "or official (IFCA's code: the summed update over all of the round's examples)",
            choices=("mean", "official"),
        ),
        "server_lr": ConfigField(float, 1.0, "first-order: server step on each cluster's averaged update", positive),
        "server_momentum": ConfigField(
            float, 0.0, "first-order: heavy-ball momentum of each cluster's server step (0: none)", _probability,
        ),
        "phase1": ConfigField(
            str, "subspace-kmeans", "coarse-estimate routine of the clustered strategies",
            choices=tuple(PHASE1),
        ),
        "moments_from": ConfigField(
            str, "all", "whose second moments estimate the subspace", choices=("all", "anchors")
        ),
        "moments": ConfigField(
            str, "residual", "Phase 1's second moments: of the residuals after a global least-squares "
            "fit (residual: the direction every cluster shares is removed, which keeps the clusters' "
            "directions above sampling noise in high dimension) or of the raw labels (raw)",
            choices=("residual", "raw"),
        ),
        "kmeans_restarts": ConfigField(int, 10, "k-means++ restarts on anchor estimates", positive),
        "anchor_steps": ConfigField(int, 100, "local steps of each anchor from the common start (phase1 = anchor-models)", positive),
        "reply": ConfigField(
            str, "clients", "cohorts reply with every client's result or per-cluster sums",
            choices=("clients", "sums"),
        ),
        "aggregate": ConfigField(
            str, "mean", "each cluster's aggregation over the clients that chose it: mean (by examples), "
            "median, trimmed-mean (robust.trim_beta), krum (robust.assumed_malicious), or your own "
            "function package.module:name (flattened models (n, P), example counts (n,) -> (P,))",
            _aggregate_rule,
        ),
    },
    "robust": {
        "trim_beta": ConfigField(float, 0.2, "fedtrimmedavg: share of each tail cut per coordinate", _trim),
        "assumed_malicious": ConfigField(int, 1, "krum/multikrum: clients assumed malicious (f)", non_negative),
        "multikrum_select": ConfigField(int, 5, "multikrum: updates averaged", positive),
        "clipping_norm": ConfigField(float, 1.0, "fedavg-clip: largest L2 norm of a client's update", positive),
    },
    "train": {
        "local_steps": ConfigField(int, 1, "local gradient steps per round", positive),
        "lr": ConfigField(float, 0.02, "local step size (capped per client by step_cap)", positive),
        "step_cap": ConfigField(
            float, 0.5, "each client's step is at most step_cap / (the largest curvature of its own "
            "loss), which keeps tiny clients' local steps contractive; 0: no cap", non_negative,
        ),
        "proximal_mu": ConfigField(float, 40.0, "FedProx proximal weight", positive),
        "lr_schedule": ConfigField(
            str, "constant", "local step size across rounds: constant, or cosine decay from lr "
            "(round 1) towards 0 (last round)", choices=LR_SCHEDULES,
        ),
    },
}


def round_lr(train: dict[str, Any], round_: int, rounds: int) -> float:
    """The local step size the server sends in round ``round_`` (1-based) of ``rounds``.

    ``cosine`` decays it like a centralised cosine schedule; with optimisers whose state is
    reset every round (Adam in a client), a constant step keeps perturbing the average.
    """
    if train.get("lr_schedule", "constant") == "constant":
        return float(train["lr"])
    return float(train["lr"]) * 0.5 * (1 + math.cos(math.pi * (round_ - 1) / rounds))


class ScenarioError(ValueError):
    """A scenario that cannot run: ``problems`` lists (dotted field, what was expected)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source, self.problems = source, problems
        lines = "\n".join(f"  {name}: {msg}" for name, msg in problems)
        super().__init__(f"invalid scenario {source}:\n{lines}")


def schema_for(workload: str) -> dict[str, dict[str, ConfigField]]:
    schema = dict(CORE_SCHEMA)
    cls = workload_class(workload)
    schema[cls.section] = cls.schema
    return schema


def _check_value(name: str, value: Any, spec: ConfigField) -> tuple[Any, str | None]:
    """Coerce and check one value; returns (value, error or None)."""
    kind = spec.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        expected = getattr(kind, "__name__", str(kind))
        return value, f"expected {expected}, got {type(value).__name__} {value!r}"
    if kind is float and not math.isfinite(value):
        return value, f"must be a finite number (got {value!r})"
    if kind is int and not -MAX_INT <= value < MAX_INT:
        return value, f"must be below 2^63 in size (got {value})"
    if spec.choices is not None and value not in spec.choices:
        return value, f"{value!r} is not one of {list(spec.choices)}"
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            return value, f"{problem} (got {value!r})"
    return value, None


def resolve(raw: dict[str, Any], source: str = "<scenario>") -> dict[str, dict[str, Any]]:
    """Validate a scenario and fill its defaults. Raises ``ScenarioError``."""
    raw = dict(raw)
    tables = raw.pop(STRATEGY_TABLES, {})
    problems: list[tuple[str, str]] = []
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        problems.append((STRATEGY_TABLES, "expected tables [strategy.<label>] of settings"))
        tables = {}
    workload = raw.get("run", {}).get("workload", CORE_SCHEMA["run"]["workload"].default)
    try:
        workload_class(workload)
    except (ValueError, TypeError) as err:  # unknown, does not import, or breaks the contract
        raise ScenarioError(source, [("run.workload", str(err))]) from None
    schema = schema_for(workload)
    for section in raw:
        if section not in schema:
            problems.append((section, f"unknown section; expected one of {sorted(schema)}"))
        elif not isinstance(raw[section], dict):
            problems.append((section, "expected a table of keys"))
    resolved: dict[str, dict[str, Any]] = {}
    for section, fields in schema.items():
        given = raw.get(section, {})
        given = given if isinstance(given, dict) else {}
        for key in given:
            if key not in fields:
                problems.append((f"{section}.{key}", f"unknown key; expected one of {sorted(fields)}"))
        out = {}
        for key, spec in fields.items():
            name = f"{section}.{key}"
            if key not in given or (given[key] is None and spec.default is None):  # unset (a resolved scenario)
                if spec.default is REQUIRED:
                    problems.append((name, f"missing; {spec.help}"))
                out[key] = copy.deepcopy(spec.default)
                continue
            value, problem = _check_value(name, given[key], spec)
            if problem:
                problems.append((name, problem))
            out[key] = value
        resolved[section] = out
    resolved[STRATEGY_TABLES] = copy.deepcopy(tables)
    if not problems and resolved["anchors"]["ids"]:  # the ids decide how many anchors there are
        anchors = resolved["anchors"]
        if anchors["count"] not in (0, len(anchors["ids"])):
            problems.append(("anchors.count", f"{anchors['count']} anchors but anchors.ids names "
                             f"{len(anchors['ids'])}; give one of the two (or the same number)"))
        anchors["count"] = len(anchors["ids"])
    if not problems:
        problems += _strategy_checks(resolved)
    if not problems:
        problems += _cross_checks(resolved)
        problems += workload_class(workload).check_scenario(resolved)
    if problems:  # a setting every label inherits is named once
        raise ScenarioError(source, list(dict.fromkeys(problems)))
    return resolved


STRATEGY_TABLES = "strategy"


def own_settings() -> dict[str, set[str]]:
    """The settings a ``[strategy.<label>]`` table may override for umbel's own strategies:
    the section its builder reads, for that label only."""
    out = {}
    for name in STRATEGIES:
        keys = set(CORE_SCHEMA["clustered"]) if name in K_MODEL else set()
        keys |= set(CORE_SCHEMA["robust"]) if name in ROBUST else set()
        keys |= {"proximal_mu"} if name in ("fedprox", "clustered-fedprox") else set()
        out[name] = keys | set(TRAIN_OVERRIDES)
    return out


def label_settings(scenario: dict[str, Any], label: str) -> dict[str, dict[str, Any]]:
    """The sections an own strategy's label reads, with its table's overrides applied."""
    given = catalog.settings(scenario, label)
    own = catalog.target(scenario, label) in STRATEGIES  # others' tables are constructor arguments
    train = {**scenario["train"], **{k: v for k, v in given.items()
                                     if own and k in ("proximal_mu", *TRAIN_OVERRIDES)}}
    return {section: {**scenario[section], **{k: v for k, v in given.items() if k in scenario[section]}}
            for section in ("clustered", "robust")} | {"train": train}


def _strategy_checks(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Every label of ``run.strategies``: what it runs and its settings (``catalog``)."""
    problems = []
    for label in s[STRATEGY_TABLES]:
        if label not in s["run"]["strategies"] and not any(
                catalog.table(s, other).get("wraps") == label for other in s["run"]["strategies"]):
            problems.append((f"{STRATEGY_TABLES}.{label}", "a table for a label that run.strategies does not list"))
    own = own_settings()
    for label in s["run"]["strategies"]:
        found = catalog.check_label(s, label, own, own)
        if not found and catalog.target(s, label) in own:  # overrides of section keys: their own checks
            for key, value in catalog.settings(s, label).items():
                spec = CORE_SCHEMA["train" if key in ("proximal_mu", *TRAIN_OVERRIDES) else
                                   "clustered" if key in CORE_SCHEMA["clustered"] else "robust"][key]
                _, problem = _check_value(f"{STRATEGY_TABLES}.{label}.{key}", value, spec)
                if problem:
                    found.append((f"{STRATEGY_TABLES}.{label}.{key}", problem))
        problems += found
    return problems


def _cross_checks(s: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    fed = s["federation"]
    strategies = [catalog.target(s, label) for label in s["run"]["strategies"]]
    cls = workload_class(s["run"]["workload"])
    problems = []
    others = [name for name in strategies if name in K_MODEL]
    if cls.single_model and others:
        problems.append(("run.strategies", f"{s['run']['workload']} trains one global model; "
                         f"{others[0]!r} is not one of {list(SINGLE_MODEL)}"))
    if fed["max_size"] < fed["min_size"]:
        problems.append(
            ("federation.max_size", f"{fed['max_size']} is below min_size {fed['min_size']}")
        )
    problems += _upload_checks(cls, s)
    for label in s["run"]["strategies"]:
        clustered = label_settings(s, label)["clustered"]
        if catalog.target(s, label) in K_MODEL and clustered["aggregate"] != "mean" and clustered["reply"] != "clients":
            problems.append(("clustered.aggregate", f"{clustered['aggregate']!r} needs every client's model: "
                             "set clustered.reply = \"clients\""))
    for label in s["run"]["strategies"]:
        if catalog.target(s, label) in K_MODEL:
            problems += _refinement_checks(cls, s, label)
    problems += _anchor_checks(s) + _data_checks(cls, s)
    if any(runs_phase1(name) for name in strategies):
        problems += _phase1_checks(cls, s)
    return problems


def _refinement_checks(cls: type[Workload], s: dict[str, Any], label: str) -> list[tuple[str, str]]:
    """What a k-model label's refinement needs of the workload and of the other settings."""
    c, where = label_settings(s, label)["clustered"], f"{STRATEGY_TABLES}.{label}" \
        if label in s[STRATEGY_TABLES] else "clustered"
    if c["refine"] != "second-order":
        if c["assignment"] == "soft":
            return [(f"{where}.assignment", "soft assignments weigh every client's normal equations on the "
                     "server: set refine = \"second-order\"")]
        if c["update"] == "official" and c["aggregate"] != "mean":
            return [(f"{where}.update", f"IFCA's official update sums the clients' updates; it cannot follow "
                     f"aggregate = {c['aggregate']!r} (use aggregate = \"mean\")")]
        return []
    if not issubclass(cls, NormalEquations):
        return [(f"{where}.refine", f"second-order needs per-client normal equations, which {cls.name} does "
                 "not provide (workloads.base.NormalEquations); use first-order")]
    clash = [(key, bad) for key, bad in (("aggregate", c["aggregate"] != "mean"), ("update", c["update"] != "mean"),
                                         ("server_momentum", c["server_momentum"] > 0))
             if bad]
    problems = [(f"{where}.{key}", f"{c[key]!r} acts on the clients' models; second-order refinement "
                 "solves each cluster's least squares from their normal equations instead") for key, _ in clash]
    if c["assignment"] == "soft" and c["reply"] != "clients":
        problems.append((f"{where}.reply", "soft assignments score every client under every model on the server: "
                         "they need per-client replies (reply = \"clients\"), not per-cluster sums"))
    if s["federation"]["scaled_update_fraction"] > 0:
        problems.append(("federation.scaled_update_fraction", "simulated attackers scale model updates; "
                         f"{label!r} refines by second order (no updates): use first-order"))
    return problems


def _anchor_checks(s: dict[str, Any]) -> list[tuple[str, str]]:
    anchors, clients = s["anchors"], s["federation"]["clients"]
    outside = [i for i in anchors["ids"] if i >= clients]
    if outside:
        return [("anchors.ids", f"client {outside[0]} does not exist: ids run 0..{clients - 1}")]
    return []


def _data_checks(cls: type[Workload], s: dict[str, Any]) -> list[tuple[str, str]]:
    """A data folder: the workload reads device files, the folder holds one file per client,
    and what needs true models or labels has a truth file."""
    data, problems = s["data"], []
    truth = truth_path(data)
    if truth is not None and not truth.is_file():
        problems.append(("data.truth", f"{str(truth)!r} is not a file"))
    if not data["folder"] and not data["deployed"]:
        return [("data.truth", "a truth file belongs to a data.folder or a deployment; a generated federation "
                 "knows its truth")] if data["truth"] else []
    if data["folder"] and not data["deployed"]:  # a deployment's data are the devices' files
        if not issubclass(cls, DeviceFiles):
            return [("data.folder", f"{cls.name} has no device file format (workloads.base.DeviceFiles)")]
        folder = Path(data["folder"]).expanduser()
        if not folder.is_dir():
            return [("data.folder", f"{str(folder)!r} is not a folder")]
        files = client_files(folder, truth)
        if len(files) != s["federation"]["clients"]:
            problems.append(("federation.clients", f"{s['federation']['clients']} clients but {str(folder)!r} "
                             f"holds {len(files)} client files (*.npz); expected one per client"))
    if truth is None:
        needs = [label for label in s["run"]["strategies"] if catalog.target(s, label) == "oracle"]
        if needs:
            problems.append(("run.strategies", f"{needs[0]!r} uses the true clusters; a data folder without "
                             "data.truth has none"))
        if s["clustered"]["init"] in ("truth", "true-first"):
            problems.append(("clustered.init", f"{s['clustered']['init']!r} needs the true models: set data.truth"))
    return problems


def _upload_checks(cls: type[Workload], s: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """``data-union`` trains on uploaded data; every other strategy on uploaded models."""
    uploads = issubclass(cls, TrainsOnUploads) and cls.uploads_data(s)
    wrong = [name for name in map(lambda label: catalog.target(s, label), s["run"]["strategies"])
             if (name == "data-union") != uploads]
    if not wrong:
        return []
    if uploads:
        return [("run.strategies", f"{wrong[0]!r} aggregates models, but the clients of this "
                 f"{cls.name} scenario upload data; use data-union")]
    return [("run.strategies", f"'data-union' trains on uploaded data, but the clients of this "
             f"{cls.name} scenario upload models; use a model aggregator (fedavg, krum, ...)")]


def _phase1_checks(cls: type[Workload], s: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Phase 1's routine sends steps the workload must answer; then the workload's own needs."""
    routine = PHASE1[s["clustered"]["phase1"]]
    answered = {ANCHOR_TRAIN, *(cls.coarse_steps if issubclass(cls, CoarseStatistics) else ())}
    missing = [step for step in routine.steps if step not in answered]
    if missing:
        usable = [name for name, r in PHASE1.items() if set(r.steps) <= answered]
        return [("clustered.phase1", f"{routine.name!r} needs the step(s) {missing}, which {cls.name} "
                 f"does not answer; use one of {usable}")]
    return cls.check_phase1(s)


RUN_CONFIG_SOURCE = "run config"
# The built-in scenarios (shipped with simulations/, in the wheel and in Flower's app bundle):
# read as files here, so that `flwr run` can name one; simulations.scenarios lists them.
BUILTIN_SCENARIOS = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"
_SCENARIO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def scenario_from_run_config(config: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The scenario and the run directory to resume, from Flower's run config (``flwr run``,
    ``umbel deploy run``): two keys, declared in ``[tool.flwr.app.config]`` of pyproject.toml.

    - ``scenario``: a built-in scenario's name (``"default"``, ``"tiny"``, ...) or a whole
      scenario as TOML text (``umbel deploy run`` sends the resolved scenario so);
    - ``resume``: a run directory to continue from its checkpoint, ``""`` for none.

    Returns (resolved scenario, resume directory or None). Raises ``ScenarioError`` naming
    the source ``run config`` and the field.
    """
    unknown = sorted(set(config) - {"scenario", "resume"})
    if unknown:
        raise ScenarioError(RUN_CONFIG_SOURCE, [(k, "unknown run-config key; expected 'scenario' (a built-in "
                                                   "name or TOML text) and 'resume'") for k in unknown])
    text = config.get("scenario", "default")
    if not isinstance(text, str) or not text.strip():
        raise ScenarioError(RUN_CONFIG_SOURCE, [("scenario", f"expected a built-in scenario name or TOML text, "
                                                             f"got {text!r}")])
    if _SCENARIO_NAME.fullmatch(text.strip()):
        path = BUILTIN_SCENARIOS / f"{text.strip()}.toml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in BUILTIN_SCENARIOS.glob("*.toml")))
            raise ScenarioError(RUN_CONFIG_SOURCE, [("scenario", f"{text.strip()!r} is not a built-in scenario "
                                                                 f"({names}) nor TOML text")])
        text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(RUN_CONFIG_SOURCE, [("scenario", f"not valid TOML: {err}")]) from None
    resume = config.get("resume", "")
    if not isinstance(resume, str):
        raise ScenarioError(RUN_CONFIG_SOURCE, [("resume", f"expected a run directory or \"\", got {resume!r}")])
    return resolve(raw, source=RUN_CONFIG_SOURCE), resume.strip() or None


def client_view(scenario: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The part of a scenario that clients need to rebuild their workload and data (``run.rounds``:
    for local training that follows the global round, e.g. PMT-IQA's easy-to-hard schedule)."""
    workload = workload_class(scenario["run"]["workload"])
    run = scenario["run"]
    return {
        "run": {"workload": run["workload"], "rounds": run["rounds"], "num_gpus": run.get("num_gpus", 0.0)},
        "federation": scenario["federation"],
        "anchors": scenario["anchors"],
        "data": scenario["data"],
        workload.section: scenario[workload.section],
    }
