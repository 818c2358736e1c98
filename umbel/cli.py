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
) -> None:
    """Run a scenario on Flower's simulation engine and write its run record."""
    from simulations.launcher import LaunchError, RunFailed, arm_labels, check_ray_address, simulate
    from simulations.scenarios import load_scenario
    from workloads import workload_class

    try:
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


if __name__ == "__main__":
    app()
