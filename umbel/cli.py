"""The ``umbel`` command: a thin face over simulations/, deployment/ and server/."""

from __future__ import annotations

import time
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
# a run stopped by a signal exits 128 + the signal's number: 130 (SIGINT), 143 (SIGTERM)


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
    force: Annotated[bool, typer.Option(
        help="start even when the run's memory estimate exceeds what this machine has")] = False,
    seeds: Annotated[Optional[str], typer.Option(
        help="run once per seed (0-4, or 0,3,7), then compare the runs (mean and spread)")] = None,
    mlflow: Annotated[bool, typer.Option(
        "--mlflow", help="track the run in MLflow (run.tracking_uri, default ./mlruns)")] = False,
) -> None:
    """Run a scenario on Flower's simulation engine and write its run record.

    Ctrl-C (SIGINT) or SIGTERM stops it between rounds: the record says `interrupted`,
    the exit code is 130 / 143, and `--resume RUN_DIR` continues it bit for bit."""
    from simulations.compare import parse_seeds, write_compare
    from simulations.launcher import LaunchError, check_out_folder, check_ray_address, check_resumable
    from simulations.scenarios import load_scenario

    try:
        if resume is not None:
            if set_ or seed is not None or out is not None or seeds:
                raise LaunchError("--resume continues a run with its own scenario; drop --set, "
                                  "--seed, --seeds and --out")
            runs = [check_resumable(resume)]
        else:
            if seeds and seed is not None:
                raise LaunchError("--seed and --seeds: give one")
            try:
                chosen = parse_seeds(seeds) if seeds else [seed]
            except ValueError as err:
                raise LaunchError(str(err)) from None
            runs = [load_scenario(scenario, set_ or [], s) for s in chosen]
        if ray_address:
            check_ray_address(ray_address)
        if resume is None:
            check_out_folder(out or runs[0]["run"]["out"])
        if mlflow or runs[0]["run"]["tracking"] == "mlflow":
            for resolved in runs:
                resolved["run"]["tracking"] = "mlflow"
    except (ScenarioError, LaunchError) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    run_dirs = [_run_one(resolved, out, ray_address, verbose, resume, force) for resolved in runs]
    if len(run_dirs) > 1:
        files = write_compare(run_dirs, (out or Path(runs[0]["run"]["out"])) /
                              f"{runs[0]['run']['name']}-seeds-{time.strftime('%Y%m%d-%H%M%S')}")
        console.print(files[0].read_text(), highlight=False, soft_wrap=True)
        console.print(f"comparison: [bold]{files[0].parent}[/]", soft_wrap=True)


def _run_one(resolved: dict[str, Any], out: Optional[Path], ray_address: Optional[str], verbose: bool,
             resume: Optional[Path], force: bool) -> Path:
    """One simulation with its live progress bars; exits the command on failure."""
    from simulations.launcher import LaunchError, RunFailed, RunInterrupted, arm_labels, simulate
    from workloads import workload_class

    key = workload_class(resolved["run"]["workload"]).key_metric_for(resolved)
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
                resume=resume, force=force,
                on_monitor=lambda address: progress.console.print(
                    f"live monitor: [bold]umbel watch {address}[/]", highlight=False),
            )
    except LaunchError as err:
        _fail(str(err), EXIT_BAD_INPUT)
    except RunFailed as err:
        _fail(str(err), EXIT_RUN_FAILED)
    except RunInterrupted as err:
        err_console.print(f"[bold yellow]{err}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code)
    console.print((run_dir / "summary.md").read_text(), highlight=False, soft_wrap=True)
    console.print(f"run record: [bold]{run_dir}[/]", soft_wrap=True)
    return run_dir


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (runs of one workload)")],
    out: Annotated[Optional[Path], typer.Option(help="folder for compare.md and the plot")] = None,
) -> None:
    """Put several runs side by side: the final table (mean and spread over seeds where a
    scenario ran with several) and the key metric's curves on one plot."""
    from simulations.compare import CompareError, write_compare

    try:
        files = write_compare(run_dirs, out)
    except CompareError as err:
        _fail(str(err), EXIT_BAD_INPUT)
    console.print(files[0].read_text(), highlight=False, soft_wrap=True)
    for f in files:
        console.print(f"wrote {f}", soft_wrap=True)


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
    from server.monitor import EVENTS, scan_events
    from server.record import DamagedRecord
    from simulations.report import write_report

    try:
        files = write_report(run_dir)
    except (FileNotFoundError, DamagedRecord, OSError) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    console.print(files[0].read_text(), highlight=False, soft_wrap=True)
    for f in files:
        console.print(f"wrote {f}", soft_wrap=True)
    damage = scan_events(run_dir / EVENTS)[1] if (run_dir / EVENTS).is_file() else None
    if damage:
        _fail(damage, EXIT_BAD_INPUT)


def _print_events(events: Any) -> str:
    """One line per event (the run's key metric from its start event on); returns the
    status of the run's end ("" when the stream stopped before it)."""
    from simulations.report import describe_event

    status, key = "", ""
    for event in events:
        kind = event.WhichOneof("kind")
        key = event.run_started.key_metric if kind == "run_started" else key
        style = {"client_failure": "yellow", "run_finished": "bold"}.get(kind, "")
        line = f"[dim]{event.seq:>5}[/] " + describe_event(event, key)
        console.print(f"[{style}]{line}[/]" if style else line, highlight=False, soft_wrap=True)
        if kind == "run_finished":
            status = event.run_finished.status
    return status


@app.command()
def watch(
    target: Annotated[str, typer.Argument(help="the monitor's host:port, or a run directory")],
    from_seq: Annotated[int, typer.Option("--from", help="replay from this event number")] = 0,
) -> None:
    """Follow a running simulation or deployment live: one line per event, until it ends."""
    import grpc

    from server.monitor import ADDRESS_FILE, scan_events, watch as follow
    from server.record import DamagedRecord, record_status

    address = target
    recorded = "running"  # a host:port: only the stream can tell
    if Path(target).is_dir():
        if not (Path(target) / ADDRESS_FILE).is_file():
            _fail(f"{target} has no {ADDRESS_FILE}: its run served no monitor", EXIT_BAD_INPUT)
        address = (Path(target) / ADDRESS_FILE).read_text().strip()
        try:
            recorded = record_status(Path(target))
        except (FileNotFoundError, DamagedRecord) as err:
            _fail(str(err), EXIT_BAD_INPUT)
    over = recorded != "running"
    status = None  # None: nothing streamed
    try:
        if not over:
            status = _print_events(follow(address, from_seq))
    except grpc.FutureTimeoutError:  # nobody listens: a run dir's record still tells it
        if not Path(target).is_dir():
            _fail(f"no monitor answers at {address} (is the run still going?)", EXIT_RUN_FAILED)
    except grpc.RpcError as err:
        _fail(f"monitor at {address}: {err.details() or err.code()}", EXIT_RUN_FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(0)
    if status is None:
        console.print("[dim]the run is over; its recorded events:[/]", highlight=False)
        try:
            events, damage = scan_events(target)
        except (OSError, ValueError) as err:
            _fail(str(err), EXIT_BAD_INPUT)
        status = _print_events(events[from_seq:])
        if damage:
            _fail(damage, EXIT_BAD_INPUT)
        if recorded.startswith("killed"):  # no end event: the record and its lock tell
            _fail(f"the run was {recorded}; `umbel run --resume {target}` continues it", EXIT_RUN_FAILED)
    if status and status != "finished":
        raise typer.Exit(EXIT_RUN_FAILED)


# ---- deployment: certificates, device data, Flower's processes -----------------------

HomeOption = Annotated[Path, typer.Option("--home", help="the deployment's folder on this machine")]
DEFAULT_HOME = Path("deploy")


@app.command()
def certs(
    home: HomeOption = DEFAULT_HOME,
    host: Annotated[Optional[list[str]], typer.Option(
        help="an address the SuperLink serves (IP or DNS name; repeatable)")] = None,
    device: Annotated[Optional[list[str]], typer.Option(help="make a key pair for this device (repeatable)")] = None,
    days: Annotated[int, typer.Option(help="validity of new certificates")] = 365,
    new_server: Annotated[bool, typer.Option(help="re-issue the server certificate (e.g. new hosts)")] = False,
) -> None:
    """Make the deployment's CA, the SuperLink's certificate and per-device keys (kept
    when they exist) in HOME/certs."""
    from deployment.certs import CertError, make_certs
    from deployment.deploy import Home

    target = Home(home).certs
    try:
        files = make_certs(target, host or ["127.0.0.1", "localhost"], device or [], days,
                           new_server=new_server or bool(host))
    except CertError as err:
        _fail(str(err), EXIT_BAD_INPUT)
    for path in files["written"]:
        console.print(f"wrote {path}", highlight=False)
    for path in files["kept"]:
        console.print(f"[dim]kept  {path}[/]", highlight=False)
    console.print("devices need ca.crt and their own key; register each .pub with "
                  "`umbel deploy register NAME`", highlight=False)


data_app = typer.Typer(no_args_is_help=True, help="Device data files.")
app.add_typer(data_app, name="data")


@data_app.command("export")
def data_export(
    scenario: Annotated[str, typer.Argument(help="built-in scenario name or TOML file")],
    folder: Annotated[Path, typer.Argument(help="where to write client-<id>.npz files")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override section.key=value")] = None,
    seed: Annotated[Optional[int], typer.Option(help="federation seed")] = None,
    labels: Annotated[bool, typer.Option(
        help="also write each client's true cluster (tests only: real devices have none)")] = False,
    truth: Annotated[bool, typer.Option(
        help="also write truth.npz (true models and clusters), the data.truth of a data folder or deployment")] = False,
) -> None:
    """Write each simulated client's data to its own file: the exact data of a simulation,
    for devices (a SuperNode's --data) or a simulation's data.folder. No cluster labels
    unless --labels; no truth file unless --truth."""
    from deployment.deploy import DeployError, export_device_data
    from simulations.scenarios import load_scenario
    from workloads import workload_class

    try:
        resolved = load_scenario(scenario, set_ or [], seed)
        files = export_device_data(resolved, folder, labels=labels, truth=truth)
    except (ScenarioError, DeployError) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    fmt = workload_class(resolved["run"]["workload"]).device_format
    console.print(f"wrote {len(files)} client files to {folder} ({fmt}) and the scenario "
                  f"({folder / 'scenario.toml'})", highlight=False, soft_wrap=True)


deploy_app = typer.Typer(no_args_is_help=True, help=(
    "Run scenarios on real machines: Flower's SuperLink and SuperNodes, TLS and device "
    "authentication on by default."))
app.add_typer(deploy_app, name="deploy")


def _deploy_fail(err: Exception) -> None:
    _fail(str(err), EXIT_RUN_FAILED)


def _insecure_warning() -> None:
    err_console.print("[bold yellow]warning:[/] --insecure: no TLS and no device "
                      "authentication; anyone who reaches the port can join or read the models",
                      highlight=False)


def _started(started: Any) -> None:
    console.print(f"started {started.name} (pid {started.pid}); log: {started.log}", highlight=False)


@deploy_app.command("superlink")
def deploy_superlink(
    home: HomeOption = DEFAULT_HOME,
    host: Annotated[str, typer.Option(help="listen address (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the SuperLink's port (devices and the CLI)")] = 9092,
    public_host: Annotated[Optional[str], typer.Option(help="address devices use to reach it")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS, no device authentication")] = False,
) -> None:
    """Start Flower's SuperLink in the background (stop it with `umbel deploy stop`)."""
    from deployment.deploy import DeployError, Home, start_superlink

    if insecure:
        _insecure_warning()
    try:
        _started(start_superlink(Home(home), host, port, insecure, public_host))
    except DeployError as err:
        _deploy_fail(err)
    console.print(f"listening on {host}:{port}" + ("" if insecure else " (TLS, device authentication on)"),
                  highlight=False)


@deploy_app.command("register")
def deploy_register(
    device: Annotated[str, typer.Argument(help="a device name (HOME/certs/devices/NAME.pub) or a .pub file")],
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Allow a device's key to join the SuperLink."""
    from deployment.certs import DEVICES
    from deployment.deploy import DeployError, Home, register_device

    h = Home(home)
    pub = Path(device) if device.endswith(".pub") else h.certs / DEVICES / f"{device}.pub"
    try:
        node = register_device(h, pub)
    except DeployError as err:
        _deploy_fail(err)
    console.print(f"registered {pub} as node {node}", highlight=False)


@deploy_app.command("supernode")
def deploy_supernode(
    name: Annotated[str, typer.Argument(help="the device's name (its key: HOME/certs/devices/NAME)")],
    data: Annotated[Path, typer.Option(help="the device's data: a client file or a folder of them")],
    superlink: Annotated[str, typer.Option(help="the SuperLink's host:port")] = "127.0.0.1:9092",
    port: Annotated[int, typer.Option(help="this node's local port (one per node on a host)")] = 9094,
    state_dir: Annotated[Optional[Path], typer.Option(help="where the device keeps its state")] = None,
    key: Annotated[Optional[Path], typer.Option(help="the device's private key")] = None,
    ca: Annotated[Optional[Path], typer.Option(help="the CA certificate that signed the SuperLink")] = None,
    home: HomeOption = DEFAULT_HOME,
    insecure: Annotated[bool, typer.Option(help="no TLS, no device authentication")] = False,
    check: Annotated[float, typer.Option(
        help="seconds to watch that it is accepted (a refused node exits)")] = 6.0,
    poll: Annotated[float, typer.Option(help="seconds between requests for messages (Flower: 3)")] = 3.0,
    heartbeat: Annotated[float, typer.Option(
        help="heartbeat interval; the SuperLink holds a silent node for two (Flower: 30, min 10)")] = 30.0,
    rejoin: Annotated[float, typer.Option(
        help="after a crash, retry for this long while the SuperLink holds the old session")] = 0.0,
) -> None:
    """Start Flower's SuperNode for one device, in the background."""
    from deployment.deploy import DeployError, Home, start_supernode, still_running

    if insecure:
        _insecure_warning()
    try:
        started = start_supernode(Home(home), name, data, superlink, port, state_dir, insecure,
                                  key, ca, poll=poll, heartbeat=heartbeat, rejoin=rejoin)
        _started(started)
        still_running(started, check)
    except DeployError as err:
        _deploy_fail(err)


@deploy_app.command("stop")
def deploy_stop(
    names: Annotated[Optional[list[str]], typer.Argument(help="processes to stop (default: all)")] = None,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Stop processes this home started (superlink, supernode-NAME)."""
    from deployment.deploy import Home, stop, stop_all

    h = Home(home)
    stopped = [n for n in names if stop(h, n)] if names else stop_all(h)
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running", highlight=False)


@deploy_app.command("status")
def deploy_status(home: HomeOption = DEFAULT_HOME) -> None:
    """The processes of this home: running or not, and their logs."""
    from deployment.deploy import Home, is_running

    h = Home(home)
    table = Table("process", "pid", "state", "log")
    for pid_file in sorted(h.pids.glob("*.pid")):
        pid = int(pid_file.read_text())
        table.add_row(pid_file.stem, str(pid), "running" if is_running(pid) else "exited",
                      str(h.logs / f"{pid_file.stem}.log"))
    console.print(table)


@deploy_app.command("run")
def deploy_run(
    scenario: Annotated[str, typer.Argument(help="built-in scenario name or TOML file")] = "deploy-tiny",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override section.key=value")] = None,
    seed: Annotated[Optional[int], typer.Option(help="federation seed")] = None,
    out: Annotated[Path, typer.Option(help="folder for the run record (on the SuperLink's machine)")] = Path("runs"),
    resume: Annotated[Optional[Path], typer.Option(help="continue an interrupted deployment run")] = None,
    home: HomeOption = DEFAULT_HOME,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the run")] = 3600.0,
) -> None:
    """Run a scenario on the deployment's SuperNodes, following its progress live."""
    import time as _time

    import grpc

    from server.monitor import ADDRESS_FILE, watch as follow
    from deployment.deploy import DeployError, Home, find_run_dir, submit, wait_run
    from simulations.launcher import LaunchError, check_resumable
    from simulations.report import write_report
    from simulations.scenarios import load_scenario

    h = Home(home)
    try:
        # a deployment's data are its devices' files: truth-based metrics only from data.truth
        resolved = check_resumable(resume) if resume else load_scenario(scenario, [*(set_ or []), "data.deployed=true"],
                                                                         seed)
    except (ScenarioError, LaunchError) as err:
        _fail(str(err), EXIT_BAD_INPUT)
    since = _time.time()
    try:
        run_id = submit(h, resolved, out, resume)
        console.print(f"submitted run {run_id} ({resolved['run']['name']}) to the SuperLink; "
                      f"Flower's logs: {h.logs / 'superlink.log'}", highlight=False)
        try:
            run_dir = resume or find_run_dir(out, resolved["run"]["name"], since, timeout=60)
            console.print(f"run record: {run_dir}", highlight=False)
        except DeployError:  # a SuperLink on another machine keeps the record there
            run_dir = None
            console.print(f"no run record under {out} here: it is on the SuperLink's machine; "
                          "waiting for the run to finish", highlight=False)
        address_file = Path(run_dir or ".") / ADDRESS_FILE

        def fresh() -> bool:  # a resumed record still holds the interrupted run's address
            return address_file.is_file() and address_file.stat().st_mtime >= since - 1

        deadline = _time.monotonic() + 60
        while run_dir and not fresh() and _time.monotonic() < deadline:
            _time.sleep(0.2)
        if run_dir and fresh():
            address = address_file.read_text().strip()
            try:
                _print_events(follow(address, 0))
            except (grpc.RpcError, grpc.FutureTimeoutError):
                pass  # the monitor went away with the run: its status says how it ended
        status = wait_run(h, run_id, timeout)
    except DeployError as err:
        _deploy_fail(err)
    if status.get("status") != "finished:completed":
        _fail(f"run {run_id} {status.get('status')}: {status.get('status-details')} "
              f"(record in {run_dir}; logs in {h.logs})", EXIT_RUN_FAILED)
    if run_dir:
        write_report(Path(run_dir))
        console.print((Path(run_dir) / "summary.md").read_text(), highlight=False, soft_wrap=True)
    else:
        console.print(f"run {run_id} finished", highlight=False)


if __name__ == "__main__":
    app()
