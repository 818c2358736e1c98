"""Scenarios: built-in TOML files, user TOML files, and ``--set`` overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from server.run_config import BUILTIN_SCENARIOS, ScenarioError, resolve

BUILTIN_DIR = BUILTIN_SCENARIOS  # simulations/scenarios/: one definition, also read by `flwr run`


def builtin_scenarios() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}


def describe(path: Path) -> str:
    """The first comment line of a scenario file: its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def locate(scenario: str) -> Path:
    """A built-in name or a path to a TOML file."""
    builtins = builtin_scenarios()
    if scenario in builtins:
        return builtins[scenario]
    path = Path(scenario)
    if path.is_file():
        return path
    raise ScenarioError(
        scenario,
        [("scenario", f"no such file, and not a built-in scenario ({', '.join(builtins)})")],
    )


STRATEGY_SECTION = "strategy"  # per-label tables: strategy.<label>.<key>=value


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value``; the value is read as TOML (``3``, ``0.5``, ``"a"``, ``[1, 2]``),
    and taken as a bare string when it is not valid TOML."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ScenarioError("--set", [(item, "expected section.key=value")])
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    """Set ``section.key=value`` (or ``strategy.<label>.<key>=value``) in a raw scenario."""
    section, key, value = parse_override(item)
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ScenarioError(source, [(section, "expected a table of keys")])
    if section == STRATEGY_SECTION and "." in key:  # a label's own table
        label, _, key = key.rpartition(".")
        raw[section].setdefault(label, {})[key] = value
    else:
        raw[section][key] = value


def load_scenario(
    scenario: str, overrides: list[str] = (), seed: int | None = None
) -> dict[str, dict[str, Any]]:
    """Read, override and validate a scenario. Raises ``ScenarioError`` naming the field."""
    path = locate(scenario)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(str(path), [("file", f"not valid TOML: {err}")]) from None
    file_tables = set(raw.get(STRATEGY_SECTION, {})) if isinstance(raw.get(STRATEGY_SECTION), dict) else set()
    for item in overrides:
        apply_override(raw, item, str(path))
    listed = raw.get("run", {}).get("strategies")
    if isinstance(listed, list) and file_tables and isinstance(raw.get(STRATEGY_SECTION), dict):
        # ``--set run.strategies=[...]`` replaces the file's list: its tables of labels no
        # longer run are dropped (a table given by ``--set`` is still checked)
        wrapped = {t.get("wraps") for t in raw[STRATEGY_SECTION].values() if isinstance(t, dict)}
        for label in file_tables - set(listed) - wrapped:
            raw[STRATEGY_SECTION].pop(label, None)
    if seed is not None:
        raw.setdefault("federation", {})["seed"] = seed
    return resolve(raw, source=str(path))
