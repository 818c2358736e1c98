"""Every strategy a scenario can name: umbel's own, Flower's server strategies, Flower's
differential-privacy wrappers, and your own by import path, each with its settings table.

``run.strategies`` lists *labels*. A label is a strategy's name, or any label with a table
``[strategy.<label>]`` whose ``use`` names what it runs (default: the label itself), so one
strategy can run twice with different settings::

    [run]
    strategies = ["fedavg", "fedadam-slow", "fedadam-fast", "dp", "mine"]
    [strategy.fedadam-slow]
    use = "fedadam"
    eta = 0.01
    [strategy.fedadam-fast]
    use = "fedadam"
    eta = 0.3
    [strategy.dp]
    use = "dp-fixed-server"      # Flower's DP wrapper ...
    wraps = "fedadam-slow"       # ... around another label or a single-model strategy name
    noise_multiplier = 0.1
    clipping_norm = 1.0
    [strategy.mine]
    use = "my_package.rules:MedianOfMeans"   # a Flower Strategy subclass or a factory
    groups = 5                               # its keyword arguments

The other keys of a table are the strategy's settings, checked against what it accepts:
- umbel's own (``STRATEGIES``): the keys of the section its builder reads, for this label
  only: ``[clustered]`` for the k-model strategies, ``[robust]`` for the robust aggregators,
  and ``proximal_mu`` for the FedProx ones;
- Flower's (``FLOWER``) and yours: the constructor's keyword arguments (scalars), minus the
  node sampling (every cohort takes part in every round, as in umbel's own strategies);
- DP wrappers (``DP``): their keyword arguments, ``wraps`` (required), and never
  ``num_sampled_clients``: a wrapper is built with the clients expected per round
  (``expected_clients``: the adaptive ones calibrate their noise to it) and told, each
  round, how many replied (the fixed-clipping noise is scaled by it).

Flower's strategies aggregate one reply per client; a cohort reply is split into one
Flower-style reply per virtual client (``FlowerAdapter``), as for the robust aggregators.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    QFedAvg,
    Strategy,
)

from strategies.aggregation import metric_means
from strategies.fedavg import collect
from strategies.result import ReportingStrategy, RoundResult
from strategies.robust import client_replies

FLOWER: dict[str, type[Strategy]] = {
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "qfedavg": QFedAvg,
    "bulyan": Bulyan,
    "flower-fedavg": FedAvg,  # Flower's own, unadapted (per-client replies): a baseline for the adapter
}
DP: dict[str, type[Strategy]] = {
    "dp-fixed-server": DifferentialPrivacyServerSideFixedClipping,
    "dp-fixed-client": DifferentialPrivacyClientSideFixedClipping,
    "dp-adaptive-server": DifferentialPrivacyServerSideAdaptiveClipping,
    "dp-adaptive-client": DifferentialPrivacyClientSideAdaptiveClipping,
}
# What umbel sets itself: every cohort takes part in every round; metric records are its own.
MANAGED = {"self", "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
           "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
           "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "strategy", "num_sampled_clients",
           "accountant", "selection_rule"}
SCALAR = (bool, int, float, str)
LIVE = "python"  # ``use = "python"``: the object handed to ``umbel.simulate`` under this label
_live: dict[str, Strategy] = {}


@contextmanager
def live_strategies(objects: dict[str, Strategy]) -> Iterator[None]:
    """Strategy objects (or factories) by label, for the runs started inside the block (the
    Python API: the ServerApp runs in this process, so nothing is serialised)."""
    _live.update(objects)
    try:
        yield
    finally:
        for label in objects:
            _live.pop(label, None)


def live_object(label: str) -> Strategy:
    obj = _live[label]
    return obj() if not isinstance(obj, Strategy) and callable(obj) else obj


class StrategyError(ValueError):
    """A strategy label that cannot be built: ``field`` is the scenario field at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def table(scenario: dict[str, Any], label: str) -> dict[str, Any]:
    return dict(scenario.get("strategy", {}).get(label, {}))


def target(scenario: dict[str, Any], label: str) -> str:
    """What a label runs: its table's ``use``, else the label itself."""
    return table(scenario, label).get("use", label)


def settings(scenario: dict[str, Any], label: str) -> dict[str, Any]:
    """A label's settings: its table without ``use`` and ``wraps``."""
    return {k: v for k, v in table(scenario, label).items() if k not in ("use", "wraps")}


def is_import_path(name: str) -> bool:
    module, sep, attribute = name.partition(":")
    return bool(sep and module and attribute)


def load_object(path: str, field: str) -> Any:
    """``package.module:Name``; ``StrategyError`` naming ``field`` when it does not import."""
    module, _, attribute = path.partition(":")
    try:
        obj = import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except ImportError as err:
        raise StrategyError(field, f"{path!r} does not import: {err}") from None
    except AttributeError:
        raise StrategyError(field, f"{path!r}: module {module!r} has no {attribute!r}") from None
    return obj


def _parameters(factory: Any) -> list[inspect.Parameter]:
    """The parameters of a class's ``__init__`` or of a factory (none when unreadable)."""
    try:
        return list(inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters.values())
    except (TypeError, ValueError):
        return []


def keywords(factory: Any) -> dict[str, inspect.Parameter]:
    """The scenario-settable keyword arguments of a class or factory (``MANAGED`` excluded)."""
    return {p.name: p for p in _parameters(factory) if p.name not in MANAGED
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_keywords(factory: Any, given: dict[str, Any], prefix: str, required_ok: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Problems with ``given`` as keyword arguments of ``factory``: unknown keys, values that
    are not scalars of the default's type, non-finite numbers, missing required ones."""
    accepted = keywords(factory)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in _parameters(factory))
    problems = []
    for key, value in given.items():
        name = f"{prefix}.{key}"
        if key not in accepted and not takes_any:
            problems.append((name, f"unknown setting; {getattr(factory, '__name__', factory)} accepts "
                                   f"{sorted(accepted) or 'no settings'}"))
            continue
        if not isinstance(value, SCALAR):
            problems.append((name, f"expected a number, a boolean or a string, got {type(value).__name__}"))
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((name, f"must be a finite number (got {value!r})"))
            continue
        default = accepted[key].default if key in accepted else None
        if isinstance(default, SCALAR):
            want = type(default)
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if not ok or (want is not bool and isinstance(value, bool)):
                problems.append((name, f"expected {want.__name__} (like its default {default!r}), got "
                                       f"{type(value).__name__} {value!r}"))
    for key, p in accepted.items():
        if p.default is inspect.Parameter.empty and key not in given and key not in required_ok:
            problems.append((f"{prefix}.{key}", "missing; required by "
                                                 f"{getattr(factory, '__name__', factory)}"))
    return problems


class FlowerAdapter(ReportingStrategy):
    """Any Flower ``Strategy`` on umbel's cohorts: the inner strategy configures the
    rounds (its own sampling, its config entries) and aggregates one Flower-style reply per
    virtual client; umbel validates the cohort replies, drops and names bad ones, and
    reports the round. ``dp``: a Flower DP wrapper, told each round how many clients replied."""

    def __init__(self, inner: Strategy, label: str) -> None:
        self.inner, self.label = inner, label
        self.dp = isinstance(inner, tuple(DP.values()))
        self.sent: ArrayRecord | None = None

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        result = RoundResult(sent=self.sent, k_models=False)
        batch = collect(replies, self.sent, result)
        if batch is None:
            return result
        result.metrics = metric_means(batch)
        if self.dp:  # the noise is calibrated to the clients that replied this round
            self.inner.num_sampled_clients = len(batch)
        arrays, _ = self.inner.aggregate_train(server_round, client_replies(batch))
        if arrays is None:
            result.dropped.append(f"{self.label}: the strategy aggregated nothing this round")
        result.arrays = arrays
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        result = RoundResult(sent=self.sent, k_models=False)
        batch = collect(replies, None, result)
        if batch is not None:
            result.metrics = metric_means(batch)
        return result


def all_nodes(num_nodes: int) -> dict[str, Any]:
    """Flower's sampling settings for every cohort in every round."""
    return dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_nodes,
                min_evaluate_nodes=num_nodes, min_available_nodes=num_nodes)


def expected_clients(scenario: dict[str, Any]) -> int:
    """Clients expected to reply per round (sampled, and not dropping out): the size Flower's
    adaptive DP wrappers calibrate their noise to when they are built."""
    fed = scenario["federation"]
    return max(1, round(fed["clients"] * fed["participation"] * (1 - fed["dropout"])))


def build_flower(scenario: dict[str, Any], label: str, num_nodes: int, lr: float, field: str | None = None) -> Strategy:
    """The Flower strategy a label names (Flower's own, a DP wrapper, or an import path)."""
    name, given = target(scenario, label), settings(scenario, label)
    field = field or f"strategy.{label}"
    if name in FLOWER:
        cls = FLOWER[name]
        if cls is QFedAvg:  # L = 1 / the clients' step size: umbel's own by default
            given.setdefault("client_learning_rate", lr)
        return cls(**all_nodes(num_nodes), **given)
    if name in DP:
        wrapped = table(scenario, label)["wraps"]
        inner = build_flower(_with_table(scenario, wrapped), wrapped, num_nodes, lr, f"{field}.wraps")
        return DP[name](inner, num_sampled_clients=expected_clients(scenario), **given)
    if is_import_path(name):
        factory = load_object(name, f"{field}.use")
        made = factory(**given)
        if not isinstance(made, Strategy):
            raise StrategyError(f"{field}.use", f"{name!r} made a {type(made).__name__}, not a Flower Strategy")
        return made
    raise StrategyError(f"{field}.use", f"{name!r} is not a Flower strategy")


def labels_with_tables(scenario: dict[str, Any]) -> set[str]:
    return set(scenario.get("strategy", {}))


def _with_table(scenario: dict[str, Any], wrapped: str) -> dict[str, Any]:
    """The scenario, with a table for ``wraps`` when it names a strategy rather than a label
    (``fedavg`` inside a DP wrapper is Flower's own FedAvg, on one reply per client)."""
    if wrapped in labels_with_tables(scenario):
        return scenario
    return {**scenario, "strategy": {**scenario.get("strategy", {}),
                                     wrapped: {"use": "flower-fedavg" if wrapped == "fedavg" else wrapped}}}


def check_label(scenario: dict[str, Any], label: str, own: Iterable[str],
                sections: dict[str, Iterable[str]]) -> list[tuple[str, str]]:
    """Problems with one label of ``run.strategies`` (its target and settings); ``own`` are
    umbel's strategy names, ``sections`` the setting keys each of them may override."""
    name, given, prefix = target(scenario, label), settings(scenario, label), f"strategy.{label}"
    own = set(own)
    if name in own:
        allowed = sections.get(name, {})
        return [(f"{prefix}.{k}", f"unknown setting for {name}; it accepts {sorted(allowed) or 'none'}")
                for k in given if k not in allowed]
    if name in FLOWER:
        return check_keywords(FLOWER[name], given, prefix, required_ok={"client_learning_rate"})
    if name in DP:
        wrapped = table(scenario, label).get("wraps")
        if not isinstance(wrapped, str) or not wrapped:
            return [(f"{prefix}.wraps", f"{name} wraps a single-model strategy: name one (a label with a "
                                        "table, fedavg, or one of " f"{sorted(FLOWER)})")]
        if wrapped in labels_with_tables(scenario):
            inner = target(scenario, wrapped)
            if inner in DP or inner in own:
                return [(f"{prefix}.wraps", f"{wrapped!r} runs {inner}; a DP wrapper takes a Flower strategy")]
            problems = check_label(scenario, wrapped, own, sections)
        elif wrapped == "fedavg" or wrapped in FLOWER:
            problems = []
        else:
            return [(f"{prefix}.wraps", f"{wrapped!r} is neither a label with a table nor one of "
                                        f"{['fedavg', *sorted(FLOWER)]}")]
        return problems + check_keywords(DP[name], given, prefix)
    if name == LIVE:
        if label not in _live:
            return [(f"{prefix}.use", f"{LIVE!r}: no strategy object was handed in for {label!r} "
                                      "(umbel.simulate(..., strategies={label: obj}))")]
        obj = _live[label]
        if not isinstance(obj, Strategy) and not (callable(obj)):
            return [(f"{prefix}.use", f"the object handed in for {label!r} is a {type(obj).__name__}, not a "
                                      "Flower Strategy or a factory")]
        return [(f"{prefix}.{k}", "settings of a strategy object go to its constructor, not the table")
                for k in given]
    if is_import_path(name):
        try:
            factory = load_object(name, f"{prefix}.use")
        except StrategyError as err:
            return [(err.field, str(err))]
        if inspect.isclass(factory) and not issubclass(factory, Strategy):
            return [(f"{prefix}.use", f"{name!r} is a class but not a Flower Strategy subclass")]
        if not callable(factory):
            return [(f"{prefix}.use", f"{name!r} is a {type(factory).__name__}, not a Strategy class or a factory")]
        return check_keywords(factory, given, prefix)
    known = sorted(own) + sorted(FLOWER) + sorted(DP)
    where = f"{prefix}.use" if label in labels_with_tables(scenario) else "run.strategies"
    return [(where, f"unknown strategy {name!r}; expected one of {known}, a label with a "
                    "[strategy.<label>] table, or an import path package.module:Name")]
