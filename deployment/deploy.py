"""Deployment on real machines: Flower's own SuperLink and SuperNode processes, wrapped.

Everything a deployment keeps on one machine lives in its *home* folder (default
``./deploy``): ``certs/`` (``umbel certs``), ``logs/<process>.log``, ``pids/<process>.pid``,
``flwr/`` (the ``FLWR_HOME`` of the processes and of the ``flwr`` CLI, with a connection
named ``umbel``), ``superlink.db`` (registered devices survive a SuperLink restart) and
``nodes/<name>/`` (a SuperNode's working folder and, by default, its state).

TLS and SuperNode authentication are on unless ``insecure=True``. The ServerApp is the same
as in simulation (``server.app:app``); it reads the scenario from Flower's run config, and
clients read their data from the files named by their ``data-path`` (``export_device_data``
writes those of a simulated federation).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from flwr.common.constant import FAB_INCLUDE_PATTERNS

from server.lock import read_lock
from server.record import SCENARIO, NotWritable, _drop_none, writable_folder
from deployment import certs as certs_mod
from server.flower_patches import FLOWER_HEARTBEAT_S, FLOWER_POLL_S
from workloads import workload_class
from workloads.base import DeviceFiles, KnownClusters
from workloads.device_files import TRUTH_FILE
from workloads.federation import cohort_slice, num_nodes

CONNECTION = "umbel"  # the flwr CLI's name for this deployment's SuperLink
LINK_PORT = 9092
FINISHED = ("finished:completed", "finished:failed", "finished:stopped")


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Started:
    """A process this module started (in its own session, so it can be stopped whole)."""

    name: str
    pid: int
    log: Path
    argv: list[str]


class Home:
    """A deployment's folder on this machine (see the module doc)."""

    def __init__(self, root: str | Path = "deploy") -> None:
        self.root = Path(root).expanduser().resolve()
        self.certs = self.root / "certs"
        self.logs = self.root / "logs"
        self.pids = self.root / "pids"
        self.flwr_home = self.root / "flwr"
        for d in (self.logs, self.pids, self.flwr_home):
            d.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        """Flower's processes and CLI: this deployment's FLWR_HOME, offline, no telemetry,
        and the Python environment umbel runs in (no per-run dependency installs)."""
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.flwr_home), FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            GRPC_VERBOSITY="ERROR", OMP_NUM_THREADS="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def node_dir(self, name: str) -> Path:
        path = self.root / "nodes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: install umbel with `make install` (it brings flwr)")
    return found


def _start(home: Home, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Started:
    """Start a process of this home (see ``refuse_if_running``)."""
    refuse_if_running(home, name)
    log = home.logs / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env={**home.env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (home.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
    return Started(name, proc.pid, log, argv)


def refuse_if_running(home: Home, name: str) -> None:
    """A process's pid file is its lock: one live ``name`` per home (a dead one's is stale)."""
    holder = read_lock(home.pids / f"{name}.pid")
    if holder is not None and is_running(holder["pid"]):
        raise DeployError(f"{name} of {home.root} is already running (process {holder['pid']}); stop it "
                          f"first with `umbel deploy stop {name} --home {home.root}`")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def is_running(pid: int) -> bool:
    """Whether a process lives (a child of ours that exited is reaped, not counted)."""
    if pid <= 0:  # os.kill(0, ...) would ask about our own process group
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# What Flower's log says when a process is refused, and what to do about it.
LOG_HINTS = {
    "Failed to activate SuperNode": "the SuperLink refused this device's key: it is not registered "
    "(run `umbel deploy register NAME` where the SuperLink runs) or the device started with another key",
    "CERTIFICATE_VERIFY_FAILED": "the SuperLink's certificate is not signed by the CA this device was given "
    "(--ca): copy the deployment's certs/ca.crt to the device",
    "address already in use": "its port is taken by another process: stop that one or choose another --port",
}


def diagnose(log: Path) -> str:
    """The fixes for the refusals Flower's log records (empty when none is known)."""
    tail = log_tail(log, 60)
    return "".join(f"\n  -> {hint}" for says, hint in LOG_HINTS.items() if says in tail)


def _check_alive(started: Started) -> None:
    if not is_running(started.pid):
        raise DeployError(f"{started.name} exited{diagnose(started.log)}\nits log ({started.log}):\n"
                          + log_tail(started.log))


def still_running(started: Started, grace: float) -> None:
    """Raise ``DeployError`` (with its log) if the process exits within ``grace`` seconds:
    a SuperNode that the SuperLink refuses (unregistered key, unknown CA) exits in ~3 s."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _check_alive(started)
        time.sleep(0.2)


def wait_for_port(host: str, port: int, started: Started, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(started)
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.25)
    raise DeployError(f"{started.name} did not listen on {host}:{port} within {timeout:.0f} s; "
                      f"see {started.log}")


# ---- the SuperLink ----------------------------------------------------------------------

def start_superlink(
    home: Home, host: str = "127.0.0.1", port: int = LINK_PORT, insecure: bool = False,
    public_host: str | None = None,
) -> Started:
    """Start ``flower-superlink`` (TLS with ``home/certs``, SuperNode authentication) and
    point the flwr CLI's ``umbel`` connection at it. ``host`` is where it listens (0.0.0.0
    for other machines); ``public_host`` the address devices and the CLI use."""
    argv = [_executable("flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(home.root / "superlink.db"),
            "--disable-runtime-dependency-installation"]
    if insecure:
        argv.append("--insecure")
    else:
        need = [home.certs / certs_mod.SERVER_CERT, home.certs / certs_mod.SERVER_KEY,
                home.certs / certs_mod.CA_CERT]
        missing = [str(p) for p in need if not p.is_file()]
        if missing:
            raise DeployError(f"TLS needs {', '.join(missing)}: run `umbel certs --home "
                              f"{home.root}` first (or pass --insecure, not for real devices)")
        argv += ["--ssl-certfile", str(need[0]), "--ssl-keyfile", str(need[1]),
                 "--ssl-ca-certfile", str(need[2]), "--enable-supernode-auth"]
    address = f"{public_host or ('127.0.0.1' if host in ('0.0.0.0', '::') else host)}:{port}"
    refuse_if_running(home, "superlink")
    check_port_free(host, port)
    write_connection(home, address, insecure)
    started = _start(home, "superlink", argv, home.root)
    wait_for_port(address.rpartition(":")[0], port, started)  # our own process: the port was free
    return started


def check_port_free(host: str, port: int) -> None:
    """``DeployError`` when something already listens on ``host:port`` (another SuperLink?):
    the new one would die on "address already in use" while the port still answers."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise DeployError(f"{host}:{port} is taken ({err.strerror}): another SuperLink or program "
                              f"listens there; stop it, or pass another --port") from None


def write_connection(home: Home, address: str, insecure: bool) -> Path:
    """The flwr CLI's connection ``umbel`` in ``home/flwr/config.toml``."""
    link: dict[str, Any] = {"address": address}
    if insecure:
        link["insecure"] = True
    else:
        link["root-certificates"] = str(home.certs / certs_mod.CA_CERT)
    path = home.flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: link}}))
    return path


def _flwr(home: Home, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run the flwr CLI with ``--format json``; its JSON answer, or ``DeployError``."""
    argv = [_executable("flwr"), *args, "--format", "json"]
    proc = subprocess.run(argv, env=home.env(), capture_output=True, text=True, timeout=timeout,
                          cwd=home.root)
    text = proc.stdout.strip()
    try:
        answer = json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stderr or proc.stdout).strip()[-800:]
        raise DeployError(f"`flwr {' '.join(args)}` failed: {detail}")
    return answer


def register_device(home: Home, public_key: str | Path) -> int:
    """Register a device's public key (``certs/devices/<name>.pub``) with the SuperLink;
    returns the node id it will have."""
    path = Path(public_key)
    if not path.is_file():
        raise DeployError(f"{path}: no such public key; make one with `umbel certs --device NAME`")
    return int(_flwr(home, "supernode", "register", str(path), CONNECTION)["node-id"])


# ---- SuperNodes -------------------------------------------------------------------------

def start_supernode(
    home: Home, name: str, data: str | Path, superlink: str = f"127.0.0.1:{LINK_PORT}",
    port: int = 9094, state_dir: str | Path | None = None, insecure: bool = False,
    key: str | Path | None = None, ca: str | Path | None = None, max_retries: int | None = None,
    poll: float = FLOWER_POLL_S, heartbeat: float = FLOWER_HEARTBEAT_S, rejoin: float = 0.0,
) -> Started:
    """Start Flower's SuperNode for one device: its data (a client file or a folder of
    them), its state folder (default ``home/nodes/<name>/state``), its key (default
    ``home/certs/devices/<name>``) and the CA that signed the SuperLink (default
    ``home/certs/ca.crt``). ``port`` is the node's own local port: one per node on a host.
    ``poll``, ``heartbeat`` and ``rejoin``: see ``deployment.supernode``."""
    data = Path(data).expanduser().resolve()
    if not data.exists():
        raise DeployError(f"--data {data}: no such file or folder")
    state = Path(state_dir).expanduser().resolve() if state_dir else home.node_dir(name) / "state"
    config = f"data-path={json.dumps(str(data))} state-dir={json.dumps(str(state))}"
    _executable("flower-supernode")  # a clear error when flwr is missing
    argv = [sys.executable, "-m", "deployment.supernode", "--poll", str(poll),
            "--heartbeat", str(heartbeat), "--rejoin", str(rejoin), "--",
            "--superlink", superlink, "--port", str(port), "--node-config", config]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if insecure:
        argv.append("--insecure")
    else:
        ca = Path(ca) if ca else home.certs / certs_mod.CA_CERT
        key = Path(key) if key else home.certs / certs_mod.DEVICES / name
        for what, path in (("CA certificate", ca), ("device key", key)):
            if not Path(path).is_file():
                raise DeployError(f"{what} {path} is missing: run `umbel certs --device {name}` "
                                  "on the machine that holds the CA, and copy it here")
        argv += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    # Flower's own knob for how often the node's SuperExec looks for ClientApps to start (1 s).
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(min(poll, 1.0))} if poll < 1.0 else {}
    return _start(home, f"supernode-{name}", argv, home.node_dir(name), env)


# ---- stopping ---------------------------------------------------------------------------

def stop(home: Home, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> bool:
    """Stop a process this home started (its whole session: a SuperNode takes its ClientApp
    processes with it); False when it was not running."""
    pid_file = home.pids / f"{name}.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    if not is_running(pid):
        return False
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_running(pid):
        os.killpg(pid, signal.SIGKILL)
    is_running(pid)  # reaps it
    return True


def stop_all(home: Home, timeout: float = 15.0) -> list[str]:
    """Stop every process of this home, SuperNodes first; returns their names."""
    names = sorted((p.stem for p in home.pids.glob("*.pid")), key=lambda n: n == "superlink")
    return [n for n in names if stop(home, n, timeout=timeout)]


# ---- runs -------------------------------------------------------------------------------

def app_dir() -> Path:
    """The Flower app folder (its pyproject names server.app:app and client.app:app)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise DeployError(f"{root} holds no pyproject.toml: run deployments from a source "
                          "checkout of umbel (the app bundle is built from it)")
    return root


# What Flower's bundler keeps, read from its own include patterns ("**/*.py", ..., "/LICENSE"),
# and the folders it never keeps.
APP_SUFFIXES = tuple(p[4:] for p in FAB_INCLUDE_PATTERNS if p.startswith("**/*."))
APP_NAMES = (".gitignore", *(p[1:] for p in FAB_INCLUDE_PATTERNS if p.startswith("/")))
SKIPPED_DIRS = ("__pycache__", "runs", "deploy", "mlruns", "build", "dist")


def stage_app(dest: Path, source: Path | None = None) -> Path:
    """A copy of the app's bundled files in ``dest`` (emptied first), for ``flwr run``.

    Flower's bundler walks and resolves every file under the folder it is given before it
    filters them: about 53,000 in a checkout holding its ``.venv``, 4 s of CPU per submitted
    run. The copy skips hidden and generated folders and keeps the files Flower would keep
    (its ``.gitignore`` included, which Flower applies again), so the bundle is the same
    (a test compares the two bundles byte for byte)."""
    source, dest = (source or app_dir()).resolve(), dest.resolve()
    shutil.rmtree(dest, ignore_errors=True)
    for folder, dirs, files in os.walk(source):
        # A deployment home inside the checkout (the copy's own folder) is never part of the app.
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS
                   and not d.endswith(".egg-info") and (Path(folder) / d) not in (dest, *dest.parents)]
        for name in files:
            if name.endswith(APP_SUFFIXES) or name in APP_NAMES:
                target = dest / Path(folder).relative_to(source) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(folder) / name, target)
    return dest


def run_config(scenario: dict[str, Any], out: Path, resume: Path | None = None) -> dict[str, str]:
    """Flower's run config of a run: the whole resolved scenario as TOML text (its run
    record under ``out``, made absolute; ``data.deployed`` set: the devices' files are the
    data, so the server scores against ``data.truth`` only) and the run directory to resume ("" for none);
    the ServerApp reads both with ``server.run_config.scenario_from_run_config``."""
    scenario = copy.deepcopy(scenario)
    scenario["run"]["out"] = str(Path(out).resolve())
    scenario.setdefault("data", {})["deployed"] = True  # truth-based metrics only from data.truth
    return {"scenario": tomli_w.dumps(_drop_none(scenario)),
            "resume": str(Path(resume).resolve()) if resume else ""}


def submit(home: Home, scenario: dict[str, Any], out: Path, resume: Path | None = None) -> int:
    """Start a run of ``scenario`` on the deployment; returns Flower's run id."""
    config = home.root / "run-config" / f"{scenario['run']['name']}-{time.strftime('%Y%m%d-%H%M%S')}.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(tomli_w.dumps(run_config(scenario, out, resume)))
    with tempfile.TemporaryDirectory(prefix="app-", dir=home.root) as staging:  # one per submit: no races
        app = stage_app(Path(staging) / "app")
        return int(_flwr(home, "run", str(app), CONNECTION, "--run-config", str(config))["run-id"])


def run_status(home: Home, run_id: int) -> dict[str, Any]:
    runs = _flwr(home, "list", CONNECTION, "--run-id", str(run_id))["runs"]
    return runs[0] if runs else {}


def stop_run(home: Home, run_id: int) -> None:
    """Stop a run (Flower's ``flwr stop``); its record keeps its last checkpoint, from which
    ``submit(..., resume=run_dir)`` continues it."""
    _flwr(home, "stop", str(run_id), CONNECTION)


def wait_run(home: Home, run_id: int, timeout: float = 3600.0, poll: float = 1.0) -> dict[str, Any]:
    """Poll the run until it finishes (``flwr run`` exits 0 whether or not the run fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run_status(home, run_id)
        if status.get("status") in FINISHED:
            return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s")


def find_run_dir(out: Path, name: str, since: float, timeout: float = 120.0) -> Path:
    """The run record the ServerApp made under ``out`` for a run submitted at ``since``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [p for p in Path(out).glob(f"{name}-*") if (p / SCENARIO).is_file()
                 and p.stat().st_mtime >= since - 1]
        if fresh:
            return max(fresh, key=lambda p: p.stat().st_mtime)
        time.sleep(0.25)
    raise DeployError(f"no run record of {name} appeared under {out} within {timeout:.0f} s")


# ---- device data ------------------------------------------------------------------------


def export_device_data(scenario: dict[str, Any], folder: str | Path, labels: bool = False,
                       truth: bool = False) -> list[Path]:
    """Each simulated client's data in its own file (``client-<id>.npz``, the workload's
    device format), plus the resolved scenario, so a deployment can run on the exact data
    of a simulation. Returns the client files.

    Device files carry no cluster labels, as on real devices. ``labels=True`` adds each
    client's true cluster (``cluster``, an int scalar) for workloads that know it
    (``KnownClusters``): only to compare a deployment with the labelled case in tests.
    ``truth=True`` writes ``truth.npz``: the true models (flattened, (k, P)) and every
    client's cluster, the ``data.truth`` of this folder or of its deployment."""
    from server.run_config import client_view

    name = scenario["run"]["workload"]
    workload = workload_class(name)(client_view(scenario))
    if not isinstance(workload, DeviceFiles):
        raise DeployError(f"workload {name} has no device file format (workloads.base.DeviceFiles)")
    for flag, wanted in (("--labels", labels), ("--truth", truth)):
        if wanted and not isinstance(workload, KnownClusters):
            raise DeployError(f"{flag}: workload {name} has no true clusters to write")
    try:
        folder = writable_folder(folder)
    except NotWritable as err:
        raise DeployError(str(err)) from None
    fed = scenario["federation"]
    parts = num_nodes(fed["clients"], fed["cohort_size"])
    width = len(str(fed["clients"] - 1))
    files, every_cluster = [], []
    for pid in range(parts):
        data = workload.client_data(cohort_slice(pid, parts, workload.num_clients))
        clusters = {}
        if labels or truth:
            known = workload.true_clusters(data)
            if known is None:
                raise DeployError(f"workload {name} does not know its clients' clusters")
            clusters = dict(zip(np.asarray(data.client_ids).tolist(), np.asarray(known).tolist()))
            every_cluster += list(clusters.values())
        for cid, arrays in workload.device_files(data):
            if labels:
                arrays = {**arrays, "cluster": np.int64(clusters[cid])}
            path = folder / f"client-{cid:0{width}d}.npz"
            np.savez(path, **arrays)
            files.append(path)
    if truth:
        models = workload.true_parameters()
        if models is None:
            raise DeployError(f"--truth: workload {name} does not know its true models")
        k = len(next(iter(models.values())))
        flat = np.concatenate([np.asarray(v, np.float64).reshape(k, -1) for v in models.values()], axis=1)
        np.savez(folder / TRUTH_FILE, models=flat, labels=np.asarray(every_cluster, np.int64))
    (folder / SCENARIO).write_text(tomli_w.dumps(_drop_none(scenario)))
    return files
