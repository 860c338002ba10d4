"""The sweep service end to end: real local Ray, real Optuna RDB, real MLflow (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from monoray.sweep.audit import audit_sweep
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.search import BASELINE_ATTR, FAIL_ATTR
from monoray.sweep.space import load_space
from monoray.sweep.tracking import ERROR_TAG, PARETO_TAG, SweepRecords

pytestmark = pytest.mark.integration
REPO = Path(__file__).parents[1]
DEMO = REPO / "search_spaces" / "demo.yaml"
SMALL = ["fixed.d_sae=64", "fixed.epochs=2", "fixed.batch_size=128", "budget.max_concurrent=2"]


def small_space(*extra: str, num_samples: int = 4):
    return load_space(DEMO, [*SMALL, f"budget.num_samples={num_samples}", *extra])


def study_of(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=ProjectPaths.resolve(root).optuna_url)


def records_of(root: Path, name: str) -> SweepRecords:
    return SweepRecords.load(ProjectPaths.resolve(root).tracking_uri, name)


def assert_consistent(root: Path, name: str, n: int, epochs: int) -> SweepRecords:
    """Study, MLflow runs and checkpoints agree; nothing RUNNING, nothing duplicated."""
    study = study_of(root, name)
    assert len(study.trials) == n
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials)
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert len(t.values) == 2
    records = records_of(root, name)
    client = records.client
    assert sorted(records.runs) == sorted(t.number for t in study.trials)
    for t in study.trials:
        run = client.get_run(records.runs[t.number])
        assert run.data.tags["mlflow.parentRunId"] == records.parent_run_id
        expected = "FINISHED" if t.state == TrialState.COMPLETE else "FAILED"
        assert run.info.status == expected, (t.number, run.info.status)
        if t.state == TrialState.COMPLETE:
            history = client.get_metric_history(run.info.run_id, "r2")
            assert sorted(m.step for m in history) == list(range(1, epochs + 1))
            assert client.list_artifacts(run.info.run_id, "checkpoint")
    assert client.get_run(records.parent_run_id).info.status == "FINISHED"
    return records


def test_demo_sweep_records_everything(ray_session, project: Path) -> None:
    space = small_space()
    result = run_sweep(space, SweepOptions(progress=False))
    assert not result.interrupted
    assert result.n_complete + result.n_failed == 4
    records = assert_consistent(project, "demo", 4, epochs=2)
    # max_concurrent 2 is two trial processes at once, though each trial is shorter than an
    # actor's start-up (Tune asks a custom searcher for one pending trial unless told).
    pids = {
        json.loads(line)["pid"]
        for f in (project / "ray" / "demo").glob("*/result.json")
        for line in f.read_text().splitlines()
    }
    assert len(pids) == 2, pids
    study = study_of(project, "demo")
    baseline = study.trials[0]
    assert baseline.user_attrs.get(BASELINE_ATTR)
    assert "mono_coef" not in baseline.params
    client = records.client
    assert client.get_run(records.runs[0]).data.params["mono_coef"] == "0.0"
    parent_files = {a.path for a in client.list_artifacts(records.parent_run_id, "pareto")}
    assert {
        "pareto/pareto.csv",
        "pareto/pareto_front.html",
        "pareto/pareto_front.png",
    } <= parent_files
    tagged = [
        n
        for n, rid in records.runs.items()
        if client.get_run(rid).data.tags.get(PARETO_TAG) == "true"
    ]
    assert tagged and result.pareto is not None
    assert sorted(tagged) == sorted(row["trial"] for row in result.pareto.rows if row["front"])
    versions = client.search_model_versions("name = 'monoray-demo'")
    assert sorted(v.run_id for v in versions) == sorted(records.runs[n] for n in tagged)
    # `monoray pareto` again is idempotent: no new versions, same front
    from monoray.sweep.pareto import publish_pareto

    again = publish_pareto(study, records, out_dir=project / "again", sweep="demo")
    assert again.rows == result.pareto.rows
    assert len(client.search_model_versions("name = 'monoray-demo'")) == len(versions)


def test_diverging_trial_fails_in_optuna_and_mlflow(ray_session, project: Path) -> None:
    space = small_space(
        "fixed.lr=null",
        "search.lr={type: categorical, choices: [0.004, 1.0e+30]}",
        "baseline.params.lr=1.0e+30",
        num_samples=3,
    )
    result = run_sweep(space, SweepOptions(name="diverge", progress=False))
    assert not result.interrupted
    study = study_of(project, "diverge")
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    assert first.user_attrs[FAIL_ATTR].startswith("diverged: loss became NaN/inf")
    records = assert_consistent(project, "diverge", 3, epochs=2)
    run = records.client.get_run(records.runs[0])
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG]


def _recorded_trial_pid(results: Path) -> int | None:
    """PID of a trial whose first epoch (result and checkpoint) the driver has recorded."""
    for path in results.glob("*/sae_trial_*/result.json"):
        lines = path.read_text().splitlines()
        if lines and (path.parent / "checkpoint_000000").is_dir():
            return int(json.loads(lines[-1])["pid"])
    return None


def _kill_first_trial_worker(results: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the process of a trial that has a checkpoint, mid-way through its next epoch."""
    while not stop.is_set():
        pid = _recorded_trial_pid(results)
        if pid is not None and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        stop.wait(0.05)


@pytest.mark.faults  # part of the fault-injection suite (tests/test_faults.py)
def test_killed_trial_worker_resumes_from_checkpoint(ray_session, project: Path) -> None:
    space = small_space("fixed.epochs=4", num_samples=2)
    temp = Path(tempfile.gettempdir())
    scratch_before = set(temp.glob("monoray-trial-*"))
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_first_trial_worker, args=(project / "ray", killed, stop), daemon=True
    )
    killer.start()
    try:
        result = run_sweep(space, SweepOptions(name="killed", progress=False))
    finally:
        stop.set()
        killer.join()
    assert killed, "the trial worker was never found to kill"
    assert result.n_complete == 2 and not result.interrupted
    records = assert_consistent(project, "killed", 2, epochs=4)
    resumed = [
        rid
        for rid in records.runs.values()
        if records.client.get_run(rid).data.metrics.get("resumed_from_epoch", 0) >= 1
    ]
    assert resumed, "no trial reports having resumed from a checkpoint"
    # The killed attempt's scratch space was in its trial's own directory, not in the temp dir.
    assert set(temp.glob("monoray-trial-*")) <= scratch_before


def _sweep_cmd(root: Path, *extra: str) -> list[str]:
    sets = [a for s in [*SMALL, "budget.num_samples=4", "fixed.epochs=3"] for a in ("--set", s)]
    return [
        sys.executable,
        "-m",
        "monoray",
        "sweep",
        str(DEMO),
        "--root",
        str(root),
        *sets,
        *extra,
    ]


@pytest.mark.faults  # part of the fault-injection suite (tests/test_faults.py)
@pytest.mark.slow  # ~80 s; `make test` has the torn-snapshot driver-kill drill (test_faults.py)
def test_driver_killed_then_resumed_finishes_exactly_n(project: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(
        _sweep_cmd(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    assert proc.stdout is not None
    # The progress prints a status line when the first trial ends; kill the driver then.
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("sweep 1/4:"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    study = study_of(project, "demo")
    assert 1 <= sum(t.state.is_finished() for t in study.trials) < 4
    done = subprocess.run(_sweep_cmd(project, "--resume"), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_consistent(project, "demo", 4, epochs=3)
    report = audit_sweep("demo", root=project)  # checkpoints and metric steps too
    assert report.ok, report.problems


def test_dry_run_uses_a_throwaway_study(ray_session, project: Path, capsys) -> None:
    space = load_space(DEMO, ["fixed.d_sae=64"])
    result = run_sweep(space, SweepOptions(dry_run=True, progress=False))
    assert result.n_complete + result.n_failed == 2
    assert result.name.startswith("dryrun-")
    assert not (project / "optuna.db").exists(), "a dry run must not touch the project stores"


def test_existing_sweep_needs_resume_or_new_name(ray_session, project: Path) -> None:
    from monoray.errors import InputError

    space = small_space("fixed.epochs=1", num_samples=1)
    run_sweep(space, SweepOptions(name="twice", progress=False))
    with pytest.raises(InputError, match="--resume"):
        run_sweep(space, SweepOptions(name="twice", progress=False))
    with pytest.raises(InputError, match="no sweep named"):
        run_sweep(space, SweepOptions(name="never-ran", resume=True, progress=False))


def test_impossible_resources_are_refused_before_anything_runs(ray_session, project: Path) -> None:
    from monoray.errors import InputError

    space = small_space("resources.gpu=1", num_samples=1)
    with pytest.raises(
        InputError, match=r"resources.gpu: each trial asks for 1 GPU but the Ray cluster has 0"
    ):
        run_sweep(space, SweepOptions(name="gpu", progress=False))
    client = MlflowClient(ProjectPaths.resolve(project).tracking_uri)
    assert client.get_experiment_by_name("monoray/gpu") is None
