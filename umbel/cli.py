"""The ``umbel`` command: a thin face over simulations/ and server/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.record import RunObserver
from server.run_config import ScenarioError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


class ProgressObserver(RunObserver):
    """A live bar per strategy: round, and the key metric after the latest round."""

    def __init__(self, progress: Progress, key_metric: str) -> None:
        self.progress, self.key = progress, key_metric
        self.tasks: dict[str, Any] = {}

    def on_strategy_start(self, strategy: str, rounds: int) -> None:
        self.tasks[strategy] = self.progress.add_task(strategy, total=rounds, metric="")

    def on_strategy_resume(self, strategy: str, rounds: int, rows: list[dict[str, Any]]) -> None:
        self.tasks[strategy] = self.progress.add_task(
            strategy, total=rounds, completed=len(rows) - 1, metric="(resumed)")

    def on_round(self, strategy: str, row: dict[str, Any]) -> None:
        value = row.get(self.key)
        metric = f"{self.key} {value:.4g}" if isinstance(value, float) else ""
        self.progress.update(self.tasks[strategy], completed=row["round"], metric=metric)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help="built-in scenario name or TOML file")] = "default",
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="override a key: section.key=value (repeatable)"),
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="federation seed")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for the run directory")] = None,
    ray_address: Annotated[
        Optional[str], typer.Option(help="attach to a running Ray cluster (host:port)")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option(help="continue an interrupted run from its last checkpoint (a run directory)"),
    ] = None,
) -> None:
    """Run a scenario on Flower's simulation engine and write its run record."""
    from simulations.launcher import (
        LaunchError, RunFailed, arm_labels, check_ray_address, check_resumable, simulate,
    )
    from simulations.scenarios import load_scenario
    from workloads import workload_class

    try:
        if resume is not None:
            if set_ or seed is not None or out is not None:
                raise LaunchError("--resume continues a run with its own scenario; drop --set, "
                                  "--seed and --out")
            resolved = check_resumable(resume)
        else:
            resolved = load_scenario(scenario, set_ or [], seed)
        if ray_address:
            check_ray_address(ray_address)
    except (ScenarioError, LaunchError) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    key = workload_class(resolved["run"]["workload"]).key_metric
    fed = resolved["federation"]
    console.print(
        f"[bold]{resolved['run']['name']}[/]: {fed['clients']} clients in cohorts of "
        f"{fed['cohort_size']}, strategies {', '.join(resolved['run']['strategies'])}, "
        f"{resolved['run']['rounds']} rounds, seed {fed['seed']}"
    )
    arms = arm_labels(resolved)
    if len(arms) > len(resolved["run"]["strategies"]):
        console.print(f"arms (each strategy on each workload variant): {', '.join(arms)}")
    columns = (
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds  {task.fields[metric]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            run_dir = simulate(
                resolved, out=out, ray_address=ray_address,
                observer=ProgressObserver(progress, key), verbose=verbose,
                warn=lambda text: progress.console.print(f"[yellow]warning:[/] {text}"),
                resume=resume,
                on_monitor=lambda address: progress.console.print(
                    f"live monitor: [bold]umbel watch {address}[/]", highlight=False),
            )
    except LaunchError as err:
        _fail(str(err), EXIT_BAD_INPUT)
    except RunFailed as err:
        _fail(str(err), EXIT_RUN_FAILED)
    console.print((run_dir / "summary.md").read_text(), highlight=False, soft_wrap=True)
    console.print(f"run record: [bold]{run_dir}[/]", soft_wrap=True)


@app.command()
def scenarios() -> None:
    """List the built-in scenarios."""
    from simulations.scenarios import builtin_scenarios, describe

    table = Table("name", "description")
    for name, path in builtin_scenarios().items():
        table.add_row(name, describe(path))
    console.print(table)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Redraw a run's summary table and plots from its history.json."""
    from simulations.report import write_report

    try:
        files = write_report(run_dir)
    except FileNotFoundError as err:
        _fail(str(err), EXIT_BAD_INPUT)
    console.print(files[0].read_text(), highlight=False, soft_wrap=True)
    for f in files:
        console.print(f"wrote {f}", soft_wrap=True)


@app.command()
def watch(
    target: Annotated[str, typer.Argument(help="the monitor's host:port, or a run directory")],
    from_seq: Annotated[int, typer.Option("--from", help="replay from this event number")] = 0,
) -> None:
    """Follow a running simulation or deployment live: one line per event, until it ends."""
    import grpc

    from server.monitor import ADDRESS_FILE, watch as follow
    from simulations.report import describe_event

    address = target
    if Path(target).is_dir():
        if not (Path(target) / ADDRESS_FILE).is_file():
            _fail(f"{target} has no {ADDRESS_FILE}: its run served no monitor", EXIT_BAD_INPUT)
        address = (Path(target) / ADDRESS_FILE).read_text().strip()
    status = ""
    try:
        for event in follow(address, from_seq):
            kind = event.WhichOneof("kind")
            style = {"client_failure": "yellow", "run_finished": "bold"}.get(kind, "")
            line = f"[dim]{event.seq:>5}[/] " + describe_event(event)
            console.print(f"[{style}]{line}[/]" if style else line, highlight=False, soft_wrap=True)
            if kind == "run_finished":
                status = event.run_finished.status
    except grpc.FutureTimeoutError:
        _fail(f"no monitor answers at {address} (is the run still going?)", EXIT_RUN_FAILED)
    except grpc.RpcError as err:
        _fail(f"monitor at {address}: {err.details() or err.code()}", EXIT_RUN_FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(0)
    if status and status != "finished":
        raise typer.Exit(EXIT_RUN_FAILED)


if __name__ == "__main__":
    app()
