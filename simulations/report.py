"""Reports drawn from a run's ``history.json``: ``summary.md`` and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from server.record import load_history, record_status  # noqa: E402


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _steady_round_time(rows: list[dict[str, Any]]) -> float | None:
    """Mean wall time of rounds after the first (the first pays data generation)."""
    times = [r["wall_time_s"] for r in rows if r["round"] >= 2 and "wall_time_s" in r]
    return sum(times) / len(times) if times else None


def loss_name(history: dict[str, Any]) -> str | None:
    """The record's name for the mean local loss (older records: found among the rows)."""
    if history.get("loss_name"):
        return history["loss_name"]
    rows = next(iter(history["strategies"].values()), [])
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    return next((k for k in ("mse", "loss") if k in keys), None)


def summary_table(history: dict[str, Any], status: str | None = None) -> str:
    """The final table; ``status`` overrides the record's own (``record_status``)."""
    key = history["key_metric"]
    lines = [
        f"# {history['name']}: {history['workload']}, seed {history['seed']} "
        f"({status or history['status']})",
        "",
    ]
    any_rows = next(iter(history["strategies"].values()), [])
    loss = loss_name(history)
    oracle = any_rows[-1].get("oracle_error") if any_rows else None
    best = max if history.get("higher_is_better") else min
    curve_x = history.get("curve_x")
    header = ["strategy", f"final {key}", f"best {key}"]
    if curve_x:
        header.append(curve_x)
    if oracle:
        header.append("÷ oracle")
    if loss:
        header.append(f"final {loss}")
    mis = any(r.get("misclustering_rate") is not None for rows in history["strategies"].values() for r in rows)
    if mis:
        header += ["misclustering", "1-point misclustering"]
    groups = group_metrics(history)
    header += groups
    extra = [m for m in history.get("summary_metrics", [])
             if any(rows and m in rows[-1] for rows in history["strategies"].values())]
    header += extra
    ari = any(rows and rows[-1].get("ari") is not None for rows in history["strategies"].values())
    if ari:
        header.append("ARI")
    header += ["rounds", "s/round", "dropped replies"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, rows in history["strategies"].items():
        if not rows:
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        cells = [name, _fmt(rows[-1].get(key)), _fmt(best(values) if values else None)]
        if curve_x:
            cells.append(_fmt(rows[-1].get("examples")))
        if oracle:
            final = rows[-1].get(key)
            cells.append(_fmt(final / oracle) if final is not None else "–")
        if loss:
            cells.append(_fmt(rows[-1].get(loss)))
        if mis:
            cells += [_fmt(rows[-1].get("misclustering_rate")), _fmt(rows[-1].get("misclustering_n1"))]
        cells += [_fmt(rows[-1].get(g)) for g in groups + extra]
        if ari:
            cells.append(_fmt(rows[-1].get("ari")))
        cells += [
            str(rows[-1]["round"]),
            _fmt(_steady_round_time(rows)),
            str(sum(r.get("dropped", 0) for r in rows)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + data_tables(history)) + "\n"


def data_tables(history: dict[str, Any]) -> list[str]:
    """Tables of the data rather than of an arm (the same in every arm's ``final["data_tables"]``:
    a list of ``title``, ``header``, ``rows``), drawn once below the summary."""
    tables = next(iter(finals(history, "data_tables").values()), [])
    lines: list[str] = []
    for table in tables:
        lines += ["", f"### {table['title']}"]
        if not table["header"]:  # a finding in one line
            continue
        lines += ["", "| " + " | ".join(table["header"]) + " |", "|" + "---|" * len(table["header"])]
        lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |"
                  for row in table["rows"]]
    return lines


def group_metrics(history: dict[str, Any]) -> list[str]:
    """Per-group breakdowns of the key metric in the final rows (``<key>_<group>``)."""
    prefix = history["key_metric"] + "_"
    names = [k for rows in history["strategies"].values() if rows for k in rows[-1]
             if k.startswith(prefix) and isinstance(rows[-1][k], (int, float))]
    return list(dict.fromkeys(names))


def finals(history: dict[str, Any], part: str) -> dict[str, Any]:
    """Each arm's ``final[part]`` (the workload's ``final_report``), where present."""
    return {name: rows[-1]["final"][part] for name, rows in history["strategies"].items()
            if rows and isinstance(rows[-1].get("final"), dict) and part in rows[-1]["final"]}


def _group_panels(history: dict[str, Any], groups: list[str], title: str, path: Path,
                  draw: Callable[[Any, str], None]) -> None:
    """One panel per group side by side, ``draw(axis, group)`` filling each."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        draw(ax, group)
        ax.set_title(group)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{history['name']}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rollout(history: dict[str, Any], path: Path) -> bool:
    """Error against time when the final model is applied again and again, one panel per
    group, one line per arm."""
    curves = finals(history, "rollout")
    if not curves:
        return False

    def draw(ax: Any, group: str) -> None:
        for name, curve in curves.items():
            if group in curve:
                ax.plot(curve["t"], curve[group], marker="o", markersize=3, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("time")
        ax.set_ylabel(f"{history['key_metric']} (rollout)")

    groups = [g for g in next(iter(curves.values())) if g != "t"]
    _group_panels(history, groups, "rollout error over time", path, draw)
    return True


def plot_fields(history: dict[str, Any], path: Path) -> bool:
    """One held-out field per group: the input, the solver's field and each arm's prediction."""
    fields = finals(history, "fields")
    if not fields:
        return False

    def draw(ax: Any, group: str) -> None:
        first = next(iter(fields.values()))[group]
        x = [i / len(first["truth"]) for i in range(len(first["truth"]))]
        ax.plot(x, first["u0"], color="0.6", linewidth=1, label="input (t = 0)")
        ax.plot(x, first["truth"], color="k", linewidth=2, label="solver")
        for name, per_group in fields.items():
            ax.plot(x, per_group[group]["prediction"], linewidth=1, linestyle="--", label=name)
        ax.set_xlabel("x")

    _group_panels(history, list(next(iter(fields.values()))), "predicted fields against the solver's", path, draw)
    return True


def plot_tradeoff(history: dict[str, Any], path: Path) -> bool:
    """One point per arm from its ``final["tradeoff"]`` (``x``, ``y`` and their labels, e.g.
    accuracy against FLOPs), labelled with the arm's name."""
    points = finals(history, "tradeoff")
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, p in points.items():
        ax.scatter([p["x"]], [p["y"]], s=30)
        ax.annotate(name, (p["x"], p["y"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    first = next(iter(points.values()))
    ax.set_xlabel(first.get("x_label", "x"))
    ax.set_ylabel(first.get("y_label", "y"))
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{history['name']}: {first.get('y_label', 'y')} against {first.get('x_label', 'x')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_label_maps(history: dict[str, Any], path: Path) -> bool:
    """Segmentations from each arm's ``final["label_maps"]`` (``input``, ``truth`` and
    ``prediction``: lists of 2-D maps, the same scenes in every arm; ``classes``: the label
    names): a column per scene, the input and the true labels on top, a row per arm."""
    maps = finals(history, "label_maps")
    if not maps:
        return False
    first = next(iter(maps.values()))
    scenes = len(first["input"])
    classes = first.get("classes", [])
    rows = [("input", first["input"], "gray"), ("truth", first["truth"], "tab10")]
    rows += [(name, m["prediction"], "tab10") for name, m in maps.items()]
    fig, axes = plt.subplots(len(rows), scenes, figsize=(1.5 * scenes + 1.6, 1.5 * len(rows)), squeeze=False)
    for r, (label, images, cmap) in enumerate(rows):
        for c in range(scenes):
            ax = axes[r][c]
            kwargs = {} if cmap == "gray" else {"vmin": 0, "vmax": 9, "interpolation": "nearest"}
            ax.imshow(images[c], cmap=cmap, **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    legend = ", ".join(f"{i}: {n}" for i, n in enumerate(classes))
    fig.suptitle(f"{history['name']}: predictions on test scenes" + (f"\n(tab10 colours {legend})" if legend else ""),
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_quality_scatter(history: dict[str, Any], path: Path) -> bool:
    """Predicted against true quality on the test set, a panel per arm, coloured by distortion
    (each arm's ``final["quality_scatter"]``: ``predicted``, ``proxy``, ``distortion``)."""
    scatters = finals(history, "quality_scatter")
    if not scatters:
        return False
    cols = min(4, len(scatters))
    rows = -(-len(scatters) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False, sharex=True, sharey=True)
    kinds = sorted({k for s in scatters.values() for k in s["distortion"]})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    for ax, (name, s) in zip(axes.ravel(), scatters.items()):
        for kind in kinds:
            at = [i for i, k in enumerate(s["distortion"]) if k == kind]
            ax.scatter([s["proxy"][i] for i in at], [s["predicted"][i] for i in at], s=3, alpha=0.5,
                       color=colours[kind], label=kind)
        ax.plot([0, 100], [0, 100], color="0.5", linewidth=0.8)
        ax.set_title(name, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel()[len(scatters):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("true score (proxy)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted score", fontsize=8)
    axes[0][0].legend(fontsize=6, markerscale=3)
    fig.suptitle(f"{history['name']}: predicted against true quality on unseen photos", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_artifact_maps(history: dict[str, Any], path: Path) -> bool:
    """One frame and its maps, a panel each (the first arm's ``final["artifact_maps"]``:
    ``names`` and same-sized 2-D ``maps``, the frame first; a title per map)."""
    figure = next(iter(finals(history, "artifact_maps").values()), None)
    if not figure or not figure["maps"]:
        return False
    names, maps = figure["names"], figure["maps"]
    cols = min(5, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.0 * rows), squeeze=False)
    for ax, name, image in zip(axes.ravel(), names, maps):
        shown = ax.imshow(image, cmap="gray" if name == "frame" else "magma", interpolation="nearest")
        if name != "frame":
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(maps):]:
        ax.axis("off")
    fig.suptitle(f"{history['name']}: {figure.get('caption', 'a frame and its maps')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_metric(history: dict[str, Any], metric: str, path: Path) -> bool:
    """One figure, one line per strategy; log scale when the values span decades."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    values_all = []
    for name, rows in history["strategies"].items():
        pts = [(r["round"], r[metric]) for r in rows if r.get(metric) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, label=name)
            values_all += [y for y in ys if y > 0]
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    rows = next(iter(history["strategies"].values()))
    if metric == history["key_metric"] and rows and rows[-1].get("oracle_error"):
        ax.axhline(rows[-1]["oracle_error"], color="k", linestyle="--", linewidth=1,
                   label="label oracle (least squares)")
    reference, label = history.get("reference_lines", {}).get(metric, (None, None))
    if reference and rows and rows[-1].get(reference) is not None:
        ax.axhline(rows[-1][reference], color="k", linestyle="--", linewidth=1, label=label)
    if values_all and max(values_all) / min(values_all) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{history['name']}: {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def curve_points(rows: list[dict[str, Any]], metric: str) -> list[tuple[float, float]]:
    """(examples, metric) at the last row of every examples level: for active learning,
    the accuracy reached at the end of each query cycle against the labels used."""
    last: dict[float, float] = {}
    for r in rows:
        if r.get("examples") and r.get(metric) is not None:
            last[r["examples"]] = r[metric]
    return sorted(last.items())


def plot_curve(history: dict[str, Any], path: Path) -> bool:
    """The key metric against the examples used (``curve_x``), one line per arm: colour by
    variant (``strategy/variant``), line style by strategy, so paired arms read together."""
    metric, arms = history["key_metric"], history["strategies"]
    variants = list(dict.fromkeys(name.partition("/")[2] or name for name in arms))
    prefixes = list(dict.fromkeys(name.partition("/")[0] for name in arms))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    drawn = False
    for name, rows in arms.items():
        pts = curve_points(rows, metric)
        if not pts:
            continue
        prefix, _, variant = name.partition("/")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3, label=name,
                color=f"C{variants.index(variant or name) % 10}",
                linestyle=styles[prefixes.index(prefix) % len(styles)])
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(history["curve_x"])
    ax.set_ylabel(metric)
    ax.set_title(f"{history['name']}: {metric} against {history['curve_x']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def describe_event(event: Any, key_metric: str = "") -> str:
    """One line per event, as ``umbel watch`` prints it and the summary lists failures;
    rounds show ``key_metric`` (the run's, from its start event) when they have it."""
    kind = event.WhichOneof("kind")
    e = getattr(event, kind)
    if kind == "run_started":
        resumed = (f", resumed after round {e.resumed_from_round} of {e.resumed_arm}"
                   if e.resumed_arm else "")
        return (f"run {e.run_name} started: {e.workload}, arms {', '.join(e.arms)}, "
                f"{e.rounds} rounds, seed {e.seed}{resumed}")
    if kind == "round_finished":
        shown = {k: e.metrics[k] for k in sorted(e.metrics)
                 if k in (key_metric, "ari") or "loss" in k or k.startswith(("mse", "accuracy"))}
        parts = [f"{k} {v:.4g}" for k, v in shown.items()]
        if e.cluster_sizes:
            parts.append(f"clusters {list(e.cluster_sizes)}")
        if e.failures:
            parts.append(f"{e.failures} failed")
        if e.wall_time_s:
            parts.append(f"{e.wall_time_s:.2f} s")
        return f"{e.arm} round {e.round}: " + ", ".join(parts)
    if kind == "client_failure":
        return f"{e.arm} round {e.round}: client failure{f' (node {e.node})' if e.node else ''}: {e.reason}"
    return f"run {e.status}" + (f": {e.error}" if e.error else "")


def events_summary(run_dir: Path, most: int = 20) -> str:
    """The run's event log in brief: starts (and resumes), client failures, the end."""
    from server.monitor import EVENTS, scan_events

    if not (run_dir / EVENTS).is_file():
        return ""
    events, damage = scan_events(run_dir / EVENTS)
    kinds = [e.WhichOneof("kind") for e in events]
    lines = [f"\n## Events ({len(events)} in {EVENTS})\n"]
    if damage:
        lines.append(f"- **damaged**: {damage}")
    lines += [f"- {describe_event(e)}" for e, k in zip(events, kinds) if k == "run_started"]
    failures = [e for e, k in zip(events, kinds) if k == "client_failure"]
    lines.append(f"- {kinds.count('round_finished')} rounds finished, {len(failures)} client failures")
    lines += [f"  - {describe_event(e)}" for e in failures[:most]]
    if len(failures) > most:
        lines.append(f"  - ... and {len(failures) - most} more")
    lines += [f"- {describe_event(e)}" for e, k in zip(events, kinds) if k == "run_finished"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> list[Path]:
    """(Re)draw ``summary.md`` and the plots of a run directory; returns the files."""
    run_dir = Path(run_dir)
    history = load_history(run_dir)
    written = [run_dir / "summary.md"]
    written[0].write_text(summary_table(history, record_status(run_dir, history)) + events_summary(run_dir))
    for metric in dict.fromkeys([history["key_metric"], loss_name(history), *history.get("plot_metrics", [])]):
        if metric and plot_metric(history, metric, run_dir / f"{metric}.png"):
            written.append(run_dir / f"{metric}.png")
    if history.get("curve_x"):
        path = run_dir / "learning_curve.png"
        if plot_curve(history, path):
            written.append(path)
    for name, plot in (("rollout.png", plot_rollout), ("fields.png", plot_fields), ("tradeoff.png", plot_tradeoff),
                       ("segmentation.png", plot_label_maps), ("quality.png", plot_quality_scatter),
                       ("artifacts.png", plot_artifact_maps)):
        if plot(history, run_dir / name):
            written.append(run_dir / name)
    return written

