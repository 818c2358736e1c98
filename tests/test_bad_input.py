"""Careless input and damaged files: every refusal exits 2 before anything starts and names
the field, path or file at fault (README, "When things go wrong")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from umbel.cli import app


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def a_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("f") / "plain-file"
    path.write_text("not a folder")
    return path


# (arguments, words the error must contain); {file} is a plain file, {out} a fresh folder
BAD_RUNS = [
    (["--set", "mixed_regression.noise=inf"], ["mixed_regression.noise", "finite"]),
    (["--set", "mixed_regression.separation=inf"], ["mixed_regression.separation", "finite"]),
    (["--set", "train.proximal_mu=inf"], ["train.proximal_mu", "finite"]),
    (["--set", "train.lr=nan"], ["train.lr"]),
    (["--set", "federation.dropout=-inf"], ["federation.dropout"]),
    (["--seed", str(2**63)], ["federation.seed", "2^63"]),
    (["--seed", "-1"], ["federation.seed"]),
    (["--set", "run.name=../../x"], ["run.name", "plain name"]),
    (["--set", "run.name=a b"], ["run.name"]),
    (["--out", "/proc/umbel-cannot-be-here"], ["/proc/umbel-cannot-be-here", "cannot write"]),
    (["--out", "{file}"], ["{file}", "file, not a folder"]),
    (["--set", "federation.clients=1000000000"], ["federation.clients (1000000000)", "--force"]),
    (["--set", "mixed_regression.dim=10000000"], ["mixed_regression.dim (10000000)", "--force"]),
]


@pytest.mark.parametrize("args, named", BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_run_input_exits_2_naming_the_field_or_path(args, named, a_file, tmp_path):
    args = [a.replace("{file}", str(a_file)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "runs")]
    result = _invoke("run", "tiny", *args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for word in named:
        assert word.replace("{file}", str(a_file)) in text, text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written


def test_data_export_to_a_file_exits_2_naming_it(a_file):
    result = _invoke("data", "export", "deploy-tiny", str(a_file))
    assert result.exit_code == 2 and str(a_file) in " ".join(result.output.split())


# ---- damaged run records --------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = _invoke("run", "tiny", "--out", str(out), "--ray-address", ray_cluster)
    assert result.exit_code == 0, result.output
    return next(out.glob("tiny-*"))


def _copy(run: Path, tmp_path: Path, status: str | None = None) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    if status:
        history = json.loads((copy / "history.json").read_text())
        history["status"] = status
        (copy / "history.json").write_text(json.dumps(history))
    return copy


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("command", ["report", "resume", "watch"])
def test_a_truncated_history_is_named_with_exit_2(finished_run, tmp_path, command):
    run = _copy(finished_run, tmp_path, status="interrupted")
    _truncate(run / "history.json")
    args = {"report": ["report", str(run)], "resume": ["run", "--resume", str(run)],
            "watch": ["watch", str(run)]}[command]
    result = _invoke(*args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "history.json is damaged" in text and "Traceback" not in text


def test_a_truncated_checkpoint_refuses_resume_and_says_how_to_recover(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path, status="interrupted")
    _truncate(run / "checkpoint.pkl")
    result = _invoke("run", "--resume", str(run))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "checkpoint.pkl is damaged" in text and "delete it" in text, text


def test_a_truncated_event_log_is_named_with_what_was_recovered(finished_run, tmp_path):
    from server.monitor import read_events

    whole = len(read_events(finished_run))
    run = _copy(finished_run, tmp_path)
    _truncate(run / "events.pb", keep=0.6)
    recovered = len(read_events(run))  # a torn tail: the events before it
    assert 0 < recovered < whole
    for args in (["report", str(run)], ["watch", str(run)]):
        result = _invoke(*args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2, text
        assert "events.pb is damaged" in text and f"the {recovered} events before it were recovered" in text
    assert "**damaged**" in (run / "summary.md").read_text()


def test_rounds_without_replies_keep_phase_1s_models_and_are_marked_empty():
    """``deploy-tiny`` with 99% dropout: Phase 1 runs (its exchange is not subject to the
    round's dropout), then no client replies; the estimates must survive the empty rounds."""
    from simulations.reference import Reference
    from simulations.scenarios import load_scenario

    rows = Reference(load_scenario("deploy-tiny", ["federation.dropout=0.99"])).run("clustered-fedavg")
    phase1 = rows[0]["estimation_error"]
    assert phase1 == pytest.approx(0.2140, abs=1e-4)  # residual moments (0.2328 on the raw ones)
    assert rows[0]["handed_in_estimation_error"] > 3 * phase1  # Phase 1 did replace the random start
    for row in rows[1:]:
        assert row["empty"] is True and row["clients"] == 0
        assert row["estimation_error"] == phase1


def test_phase_1_without_enough_healthy_anchors_names_every_failed_node_and_its_file(tmp_path):
    """Three devices, all anchors, two with truncated files: Phase 1 gets one estimate for
    two clusters, and its error names both failed nodes with the file each could not read
    (the devices' ClientApp path, through the in-process grid with device node configs)."""
    from client.app import app as client_app
    from deployment.deploy import export_device_data
    from simulations.local_grid import LocalGrid
    from simulations.reference import Reference
    from simulations.scenarios import load_scenario
    from strategies.coarse_init import CoarseInitError

    scenario = load_scenario("deploy-tiny")
    files = export_device_data(scenario, tmp_path / "data")
    for broken in files[1:]:
        broken.write_bytes(broken.read_bytes()[:150])
    ref = Reference(scenario)
    ref.grid = LocalGrid(client_app, [{"data-path": str(f)} for f in files])
    with pytest.raises(CoarseInitError) as failed:
        ref.run("clustered-fedavg")
    text = str(failed.value)
    assert "1 anchor estimates for 2 clusters" in text and "raise anchors.count" not in text
    for node, broken in ((2, files[1]), (3, files[2])):
        assert f"node {node} left out" in text and broken.name in text, text
