"""MO-ASHA in real digits sweeps: PRUNED in Optuna, KILLED + tagged in MLflow, clean audit.

Real local Ray, Optuna SQLite, MLflow SQLite, torch on digits. The driver kill +
`--resume` reuses the helpers of `test_faults.py`.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from monoray.sweep.audit import audit_sweep
from monoray.sweep.moasha import RUNGS_FILE
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.search import STOPPED_ATTR, STOPPED_EPOCH_ATTR, STOPPED_VALUES_ATTR
from monoray.sweep.space import load_space
from monoray.sweep.tracking import PARETO_TAG, STOPPED_TAG, SweepRecords
from tests.test_faults import (
    DEMO,
    Injector,
    driver_cmd,
    kill_driver_when,
    metric_values,
    poll,
    resumed_to_the_end,
    running_at,
    study_trials,
    trial_dirs,
)

pytestmark = pytest.mark.integration
EPOCHS = 6
STOPPING = [
    "scheduler.type=mo_asha",
    "scheduler.grace_epochs=1",
    "scheduler.reduction_factor=2",
    # A wide lr range: some trials are far behind at epoch 1 and stay behind.
    "search.lr={type: loguniform, low: 1.0e-5, high: 3.0e-2}",
    "fixed.lr=null",
    "baseline.params.lr=0.003",
]


def check_records(root: Path, name: str, budget: int) -> list[optuna.trial.FrozenTrial]:
    """N trials COMPLETE or PRUNED (one PRUNED at least), N runs, front of COMPLETE only."""
    study = optuna.load_study(study_name=name, storage=ProjectPaths.resolve(root).optuna_url)
    trials = study.trials
    assert len(trials) == budget
    states = [t.state for t in trials]
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    records = SweepRecords.load(ProjectPaths.resolve(root).tracking_uri, name)
    assert sorted(records.runs) == [t.number for t in trials]
    client = records.client
    for t in trials:
        run = client.get_run(records.runs[t.number])
        last = {k: client.get_metric_history(run.info.run_id, k)[-1].value for k in ("epoch", "r2")}
        if t.state == TrialState.PRUNED:
            epoch = t.user_attrs[STOPPED_EPOCH_ATTR]
            assert run.info.status == "KILLED"
            assert run.data.tags[STOPPED_TAG] == t.user_attrs[STOPPED_ATTR]
            assert run.data.tags[STOPPED_TAG].startswith("rung ")
            assert f"(epoch {epoch})" in run.data.tags[STOPPED_TAG]
            assert 1 <= epoch < EPOCHS and last["epoch"] == epoch
            assert t.user_attrs[STOPPED_VALUES_ATTR][0] == last["r2"]
            assert run.data.tags[PARETO_TAG] == "false"
        else:
            assert run.info.status == "FINISHED" and last["epoch"] == EPOCHS
    front = {t.number for t in study.best_trials}
    assert front and all(trials[n].state == TrialState.COMPLETE for n in front)
    csv_path = ProjectPaths.resolve(root).sweep_dir(name) / "pareto.csv"
    listed = {int(row["trial"]) for row in csv.DictReader(csv_path.open())}
    assert front <= listed and all(trials[n].state == TrialState.COMPLETE for n in listed)
    pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
    report = audit_sweep(name, root=root)
    assert report.ok, "\n".join(map(str, report.problems))
    assert (report.n_trials, report.n_runs, report.n_pruned) == (budget, budget, len(pruned))
    return trials


def tune_statuses(exp_dir: Path) -> dict[str, str]:
    """Ray trial id -> status in Tune's newest experiment snapshot (empty while unreadable)."""
    snapshots = sorted(exp_dir.glob("experiment_state-*.json"))
    try:
        data = json.loads(snapshots[-1].read_text()) if snapshots else {"trial_data": []}
    except ValueError:  # being written
        return {}
    trials = [json.loads(row[0]) for row in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def rungs_of(root: Path, name: str) -> dict:
    return json.loads((root / "ray" / name / RUNGS_FILE).read_text())


SETS = [
    "fixed.d_sae=64",
    f"fixed.epochs={EPOCHS}",
    "fixed.batch_size=128",
    "budget.num_samples=6",
    "budget.max_concurrent=2",
    *STOPPING,
]


@pytest.mark.timeout(600)
def test_digits_sweep_with_stopping(ray_session, project: Path) -> None:
    space = load_space(DEMO, SETS)
    result = run_sweep(space, SweepOptions(name="stop", progress=False))
    assert not result.interrupted and result.n_pruned >= 1
    assert result.n_complete + result.n_pruned == 6
    trials = check_records(project, "stop", 6)
    rungs = rungs_of(project, "stop")
    assert sorted(rungs["rungs"]) == ["1", "2", "4"]
    assert len(rungs["rungs"]["1"]) == 6  # every trial reaches the grace epoch
    assert len(rungs["stopped"]) == result.n_pruned
    # Every trial that ran past a rung was kept there: it ranked in the best ceil(n/η).
    reached = {e: {row["trial_id"] for row in rows} for e, rows in rungs["rungs"].items()}
    assert reached["2"] <= reached["1"] and reached["4"] <= reached["2"]
    assert sum(t.state == TrialState.PRUNED for t in trials) == len(rungs["stopped"])


# `make test-all` only: one CI run ended a killed trial FAIL instead of PRUNED (issue 16 note).
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stopping_with_retries_from_checkpoints(ray_session, project: Path) -> None:
    """Two trials lose their worker after epoch 1 (a rung): each retry resumes from its
    checkpoint, is judged at the next rungs, and the records stay consistent."""
    killed: dict[int, int] = {}

    def kill_two(stop: threading.Event) -> None:
        def one() -> bool:
            for d in trial_dirs(project / "ray" / "retry"):
                r = running_at(d, EPOCHS, at_least=1)
                if r is not None and int(r["config"]["_optuna_trial"]) not in killed:
                    os.kill(r["pid"], signal.SIGKILL)
                    killed[int(r["config"]["_optuna_trial"])] = r["epoch"]
            return len(killed) >= 2

        poll(stop, one, "2 trials to kill")

    space = load_space(DEMO, [*SETS, "budget.max_failures=2"])
    with Injector(kill_two):
        result = run_sweep(space, SweepOptions(name="retry", progress=False))
    assert not result.interrupted and len(killed) == 2, killed
    check_records(project, "retry", 6)
    # A killed worker may also have been one Tune was already stopping (or reusing):
    # at least one of the two trials really resumed from its checkpoint.
    resumed = [max(metric_values(project, "retry", n, "resumed_from_epoch")) for n in killed]
    assert max(resumed) >= 1, (killed, resumed)


@pytest.mark.timeout(900)
def test_driver_killed_then_resumed_keeps_the_rungs(tmp_path: Path) -> None:
    """Killed once a PRUNED trial is TERMINATED in Tune's snapshot and another runs:
    `--resume` finishes with the rung tables of before the kill (every trial in rung 1,
    the stopped one included, though Tune does not run it again)."""
    root, name, budget = tmp_path / "runs", "stopkill", 4
    cmd = driver_cmd(root, name, budget, EPOCHS)
    cmd += [a for s in STOPPING for a in ("--set", s)]

    def ready() -> bool:
        # A stop Tune's own snapshot already holds as TERMINATED: that trial does not run
        # again, so only the restored rung state can bring its rung-1 entry back.
        trials = study_trials(root, name)
        snapshot = tune_statuses(root / "ray" / name)
        pruned_and_saved = any(
            s == "PRUNED" and snapshot.get(ray_id) == "TERMINATED" for s, ray_id in trials
        )
        return pruned_and_saved and any(s == "RUNNING" for s, _ in trials)

    kill_driver_when(cmd, tmp_path / "first.log", ready, "a trial PRUNED and another running")
    before = [state for state, _ in study_trials(root, name)]
    resumed_to_the_end(root, name, cmd, budget)
    check_records(root, name, budget)
    rungs = rungs_of(root, name)
    assert len(rungs["rungs"]["1"]) == budget, (before, rungs)
