"""Several runs side by side: ``umbel compare RUN_DIR...`` and ``umbel run --seeds``.

Runs of the same scenario (same run name) with different seeds are pooled: each arm's final
and best key metric as the mean and standard deviation over the seeds, and its curve as the
mean over seeds with a band from the lowest to the highest. Runs of different scenarios stay
apart (one group each). The key metric must be the same for every run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.report import _fmt, plt
from server.record import load_history


class CompareError(ValueError):
    """Runs that cannot be compared; the message names the run."""


def load_runs(run_dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    from server.record import DamagedRecord

    runs = []
    for d in run_dirs:
        try:
            runs.append((Path(d), load_history(Path(d))))
        except (FileNotFoundError, DamagedRecord) as err:
            raise CompareError(str(err)) from None
    keys = {h["key_metric"] for _, h in runs}
    if len(keys) > 1:
        raise CompareError(f"the runs measure different key metrics ({', '.join(sorted(keys))}): compare "
                           "runs of one workload")
    return runs


def groups(runs: list[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, dict[int, list[dict[str, Any]]]]]:
    """scenario name -> arm -> seed -> the arm's rows (a seed run twice: the later one)."""
    out: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    for _, history in runs:
        for arm, rows in history["strategies"].items():
            if rows:
                out.setdefault(history["name"], {}).setdefault(arm, {})[history["seed"]] = rows
    return out


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


def compare_table(runs: list[tuple[Path, dict[str, Any]]]) -> str:
    first = runs[0][1]
    key, better = first["key_metric"], (max if first.get("higher_is_better") else min)
    lines = [f"# {len(runs)} runs compared: {key}", "",
             f"| scenario | arm | seeds | final {key} | best {key} | rounds |", "|---|---|---|---|---|---|"]
    for name, arms in groups(runs).items():
        for arm, by_seed in arms.items():
            finals = [rows[-1].get(key) for rows in by_seed.values()]
            bests = [better([r[key] for r in rows if r.get(key) is not None], default=None) for rows in by_seed.values()]
            rounds = {rows[-1]["round"] for rows in by_seed.values()}
            lines.append(f"| {name} | {arm} | {', '.join(map(str, sorted(by_seed)))} | {_stat(finals)} | "
                         f"{_stat(bests)} | {', '.join(map(str, sorted(rounds)))} |")
    lines += ["", "Runs: " + ", ".join(str(d) for d, _ in runs), ""]
    return "\n".join(lines)


def plot_compare(runs: list[tuple[Path, dict[str, Any]]], path: Path) -> bool:
    """The key metric per round: one line per (scenario, arm), the mean over its seeds, with
    a band from the lowest to the highest seed."""
    key = runs[0][1]["key_metric"]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    several = len(groups(runs)) > 1
    positive = []
    for name, arms in groups(runs).items():
        for arm, by_seed in arms.items():
            curves = [{r["round"]: r[key] for r in rows if r.get(key) is not None} for rows in by_seed.values()]
            rounds = sorted(set.intersection(*(set(c) for c in curves)))
            if not rounds:
                continue
            values = np.array([[c[r] for r in rounds] for c in curves])
            label = f"{name}: {arm}" if several else arm
            line, = ax.plot(rounds, values.mean(axis=0), label=f"{label} ({len(curves)} seeds)" if len(curves) > 1 else label)
            if len(curves) > 1:
                ax.fill_between(rounds, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            positive += [v for v in values.ravel() if v > 0]
    if not positive:
        plt.close(fig)
        return False
    if max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.set_title(f"{key}: mean over seeds, band: lowest to highest")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_compare(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    """``compare.md`` and ``compare_<key>.png`` in ``out`` (default: a new folder beside the
    first run); returns the files."""
    runs = load_runs(run_dirs)
    out = Path(out) if out else Path(run_dirs[0]).parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.md"]
    files[0].write_text(compare_table(runs))
    plot = out / f"compare_{runs[0][1]['key_metric']}.png"
    if plot_compare(runs, plot):
        files.append(plot)
    return files


def parse_seeds(text: str) -> list[int]:
    """``0-4`` or ``0,3,7`` (or both: ``0-2,9``) -> the seeds, in order, without repeats."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"--seeds {text!r}: expected a range 0-4 or a list 0,3,7")
        span = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        if dash and int(hi) < int(lo):
            raise ValueError(f"--seeds {text!r}: the range {part} is empty")
        seeds += [s for s in span if s not in seeds]
    return seeds
