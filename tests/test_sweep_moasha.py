"""MO-ASHA in real digits sweeps: PRUNED in Optuna, KILLED + tagged in MLflow, clean audit.

Real local Ray, Optuna SQLite, MLflow SQLite, torch on digits. The driver kill +
`--resume` reuses the helpers of `test_faults.py`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from monoray.sweep.audit import audit_sweep
from monoray.sweep.moasha import RUNGS_FILE
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.search import (
    RAY_TRIAL_ATTR,
    STOPPED_ATTR,
    STOPPED_EPOCH_ATTR,
    STOPPED_VALUES_ATTR,
)
from monoray.sweep.space import load_space
from monoray.sweep.tracking import PARETO_TAG, STOPPED_TAG, SweepRecords
from tests.test_faults import (
    DEMO,
    Injector,
    driver_cmd,
    is_trial_worker,
    kill_driver_when,
    last_result,
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


def set_tune_status(exp_dir: Path, trial_id: str, status: str) -> None:
    """Rewrite one trial's status in Tune's newest stored snapshot (its only JSON field)."""
    path = sorted(exp_dir.glob("experiment_state-*.json"))[-1]
    data = json.loads(path.read_text())
    for row in data["trial_data"]:
        trial = json.loads(row[0])
        if trial["trial_id"] == trial_id:
            row[0] = json.dumps({**trial, "status": status})
    path.write_text(json.dumps(data))


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
    reached = {e: {row["trial"] for row in rows} for e, rows in rungs["rungs"].items()}
    assert reached["2"] <= reached["1"] and reached["4"] <= reached["2"]
    assert sum(t.state == TrialState.PRUNED for t in trials) == len(rungs["stopped"])


@pytest.mark.timeout(600)
def test_stopping_with_retries_from_checkpoints(ray_session, project: Path) -> None:
    """Two trials lose their worker after epoch 1 (a rung): each retry resumes from its
    checkpoint, is judged at the next rungs, and the records stay consistent.

    Only a worker the scheduler kept is killed: the result line Tune wrote says `done`
    false. A stopped trial's worker is cached by Tune and reused for the next trial, so
    the pid in its result would name that new trial's worker; killed while Tune resets it
    for the new trial, Tune counts the one death twice (the actor and its reset task),
    the first requeues the trial and the second, seeing it PENDING, fails it for good:
    the FAIL once seen in CI."""
    killed: dict[int, int] = {}

    def kill_two(stop: threading.Event) -> None:
        def one() -> bool:
            for d in trial_dirs(project / "ray" / "retry"):
                r = running_at(d, EPOCHS, at_least=1)
                if r is None or r.get("done"):
                    continue
                if int(r["config"]["_optuna_trial"]) not in killed:
                    os.kill(r["pid"], signal.SIGKILL)
                    killed[int(r["config"]["_optuna_trial"])] = r["epoch"]
            return len(killed) >= 2

        poll(stop, one, "2 trials to kill")

    space = load_space(DEMO, [*SETS, "budget.max_failures=2"])
    with Injector(kill_two):
        result = run_sweep(space, SweepOptions(name="retry", progress=False))
    assert not result.interrupted and len(killed) == 2, killed
    check_records(project, "retry", 6)
    # Each killed worker was training its own trial on: each retry resumed from its checkpoint.
    resumed = [max(metric_values(project, "retry", n, "resumed_from_epoch")) for n in killed]
    assert min(resumed) >= 1, (killed, resumed)


def pruned_and_saved(root: Path, name: str) -> list[str]:
    """Ray ids of the trials PRUNED in Optuna and TERMINATED in Tune's stored snapshot."""
    snapshot = tune_statuses(root / "ray" / name)
    return [
        ray_id
        for s, ray_id in study_trials(root, name)
        if s == "PRUNED" and snapshot.get(ray_id) == "TERMINATED"
    ]


def kill_once_a_stop_is_saved(root: Path, name: str, cmd: list[str], log: Path) -> None:
    """SIGKILL the driver once a PRUNED trial is TERMINATED in Tune's snapshot while
    another trial is RUNNING.

    The window is forced open: once the first stop reaches Optuna, the workers of the
    trials still RUNNING there are SIGSTOPped, so they stay RUNNING until the driver,
    which goes on snapshotting, has written the stop into Tune's snapshot (on a quiet box
    the other trials could otherwise finish first)."""
    frozen: list[int] = []

    def ready() -> bool:
        trials = study_trials(root, name)
        if not frozen and any(s == "PRUNED" for s, _ in trials):
            running = {ray_id for s, ray_id in trials if s == "RUNNING"}
            for d in trial_dirs(root / "ray" / name):
                r = last_result(d)
                if r and r["trial_id"] in running and is_trial_worker(r["pid"]):
                    os.kill(r["pid"], signal.SIGSTOP)
                    frozen.append(r["pid"])
        running = any(s == "RUNNING" for s, _ in trials)
        return running and bool(pruned_and_saved(root, name))

    try:
        kill_driver_when(cmd, log, ready, "a trial PRUNED and another running")
    finally:
        for pid in frozen:  # the killed cluster's workers exit once they run again
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert frozen, "no trial was running when the first stop reached Optuna"


@pytest.mark.slow  # two driver starts (~100 s on the shared 2-CPU box): `make test-all`
@pytest.mark.timeout(900)
def test_driver_killed_then_resumed_keeps_the_rungs(tmp_path: Path) -> None:
    """Killed once a PRUNED trial is TERMINATED in Tune's snapshot and another runs:
    `--resume` finishes with the rung tables of before the kill (every trial in rung 1,
    the stopped one included, though Tune does not run it again); the window is forced
    open (`kill_once_a_stop_is_saved`)."""
    root, name, budget = tmp_path / "runs", "stopkill", 4
    cmd = driver_cmd(root, name, budget, EPOCHS)
    cmd += [a for s in STOPPING for a in ("--set", s)]
    # A stop Tune's own snapshot already holds as TERMINATED: that trial does not run
    # again, so only the restored rung state can bring its rung-1 entry back.
    kill_once_a_stop_is_saved(root, name, cmd, tmp_path / "first.log")
    before = [state for state, _ in study_trials(root, name)]
    resumed_to_the_end(root, name, cmd, budget)
    check_records(root, name, budget)
    rungs = rungs_of(root, name)
    assert len(rungs["rungs"]["1"]) == budget, (before, rungs)


@pytest.mark.timeout(900)
def test_trial_restored_at_its_stop_epoch_trains_no_further(tmp_path: Path) -> None:
    """Issue 16, the resume gap: the driver dies once a stopped trial's stop-epoch checkpoint
    is in Tune's snapshot but the trial is not yet TERMINATED there (built here by setting
    it back to RUNNING in the stored snapshot after the kill). On `--resume` the restored
    trial first re-reports its checkpoint's epoch, the standing verdict stops it there:
    no epoch past the stop is trained or logged (before: one more epoch, in MLflow too, and
    the audit saw it as a mismatch with `stopped_values`)."""
    root, name, budget = tmp_path / "runs", "gap", 4
    cmd = driver_cmd(root, name, budget, EPOCHS)
    cmd += [a for s in STOPPING for a in ("--set", s)]
    exp = root / "ray" / name
    kill_once_a_stop_is_saved(root, name, cmd, tmp_path / "first.log")
    stopped = pruned_and_saved(root, name)
    set_tune_status(exp, stopped[0], "RUNNING")
    resumed_to_the_end(root, name, cmd, budget)
    trials = check_records(root, name, budget)  # a PRUNED run's last epoch is its stop epoch
    (again,) = [t for t in trials if t.user_attrs.get(RAY_TRIAL_ATTR) == stopped[0]]
    epochs = metric_values(root, name, again.number, "epoch")
    assert epochs == list(range(1, again.user_attrs[STOPPED_EPOCH_ATTR] + 1)), epochs


PACKED_EPOCHS = 4
PACKED = [
    "fixed.d_sae=64",
    f"fixed.epochs={PACKED_EPOCHS}",
    "fixed.batch_size=32",
    "budget.num_samples=2",
    "budget.max_concurrent=1",
    "resources.pack=2",
    "constraints=[]",
    "scheduler={type: mo_asha, grace_epochs: 1, reduction_factor: 2}",
    # A grid, in order: member 0 reaches rung 1 first and is kept (alone there); member 1, at
    # an lr that leaves it at its random init, cannot dominate it, and ceil(2/2) = 1 is kept.
    "sampler={type: grid}",
    "baseline=false",
    "fixed.lr=null",
    "fixed.mono_coef=0.03",
    "fixed.arch=batchtopk",
    "fixed.k=8",
    "search={lr: {type: categorical, choices: [0.003, 1.0e-6]}}",
]


def check_packed_stop(root: Path, name: str, epochs: int = PACKED_EPOCHS) -> list[FrozenTrial]:
    """One pack of 2: member 1 PRUNED alone at epoch 1 (never trained past it), member 0
    (same pack) COMPLETE after `epochs`; a clean audit."""
    study = optuna.load_study(study_name=name, storage=ProjectPaths.resolve(root).optuna_url)
    done, stopped = study.trials
    assert done.user_attrs[RAY_TRIAL_ATTR] == stopped.user_attrs[RAY_TRIAL_ATTR]  # one pack
    assert (done.state, stopped.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert stopped.user_attrs[STOPPED_EPOCH_ATTR] == 1
    assert stopped.user_attrs[STOPPED_ATTR].startswith("rung 1 (epoch 1): ")
    records = SweepRecords.load(ProjectPaths.resolve(root).tracking_uri, name)
    client = records.client
    run = client.get_run(records.runs[stopped.number])
    assert run.info.status == "KILLED"
    assert run.data.tags[STOPPED_TAG] == stopped.user_attrs[STOPPED_ATTR]
    assert metric_values(root, name, stopped.number, "epoch") == [1]
    r2 = metric_values(root, name, stopped.number, "r2")
    assert stopped.user_attrs[STOPPED_VALUES_ATTR][0] == r2[-1]
    assert client.get_run(records.runs[done.number]).info.status == "FINISHED"
    assert metric_values(root, name, done.number, "epoch") == list(range(1, epochs + 1))
    assert [t.number for t in study.best_trials] == [done.number]
    report = audit_sweep(name, root=root)
    assert report.ok, "\n".join(map(str, report.problems))
    assert (report.n_complete, report.n_pruned) == (1, 1)
    assert list(rungs_of(root, name)["stopped"]) == [str(stopped.number)]
    return [done, stopped]


@pytest.mark.timeout(300)
def test_packed_member_is_stopped_alone(ray_session, project: Path) -> None:
    space = load_space(DEMO, PACKED)
    result = run_sweep(space, SweepOptions(name="pstop", progress=False))
    assert not result.interrupted
    assert (result.n_complete, result.n_pruned) == (1, 1)
    check_packed_stop(project, "pstop")
    rungs = rungs_of(project, "pstop")["rungs"]
    assert [row["trial"] for row in rungs["1"]] == ["0", "1"]  # member-keyed, in arrival order


LONG = "fixed.epochs=8"
"""Member 0 trains 7 epochs after member 1's stop: the window a fault is injected in."""


def first_stop_in(root: Path, name: str) -> bool:
    return any(s == "PRUNED" for s, _ in study_trials(root, name))


def kill_the_pack_after_a_stop(
    root: Path, name: str, killed: list[int]
) -> Callable[[threading.Event], None]:
    """An injector: SIGKILL the pack's worker once a member's stop reached Optuna (the
    epoch it was at is appended to `killed`)."""

    def inject(stop: threading.Event) -> None:
        def one() -> bool:
            if not first_stop_in(root, name):
                return False
            for d in (root / "ray" / name).glob("sae_pack_trial_*"):
                r = last_result(d)
                if r is not None and is_trial_worker(r["pid"]):
                    os.kill(r["pid"], signal.SIGKILL)
                    killed.append(r["epoch"])
                    return True
            return False

        poll(stop, one, "member 1 PRUNED while its pack trains")

    return inject


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_packed_member_stays_stopped_when_its_pack_is_retried(ray_session, project: Path) -> None:
    """The pack's worker is SIGKILLed once member 1's stop reached Optuna: the retry
    restores member 1 at its stop epoch, it reports it again, the standing verdict stops
    it before it trains: it is not trained again nor judged again."""
    killed: list[int] = []
    space = load_space(DEMO, [*PACKED, LONG])
    with Injector(kill_the_pack_after_a_stop(project, "pretry", killed)):
        result = run_sweep(space, SweepOptions(name="pretry", progress=False))
    assert killed and not result.interrupted
    done, _ = check_packed_stop(project, "pretry", epochs=8)
    assert max(metric_values(project, "pretry", done.number, "resumed_from_epoch")) >= 1


@pytest.mark.slow  # two driver starts (~115 s on the shared 2-CPU box): `make test-all`; the
# retried pack above runs the same restore path in `make test`
@pytest.mark.timeout(900)
def test_packed_driver_killed_after_a_member_stop_then_resumed(tmp_path: Path) -> None:
    """The driver dies once member 1's stop reached Optuna, its pack still training member
    0: `--resume` restores the verdict (from the study), member 1 is not trained or judged
    again, member 0 finishes, and the records agree."""
    root, name = tmp_path / "runs", "pkill"
    cmd = driver_cmd(root, name, 2, 8)
    cmd += [a for s in [*PACKED, LONG] for a in ("--set", s)]
    kill_driver_when(
        cmd, tmp_path / "first.log", lambda: first_stop_in(root, name), "member 1 PRUNED"
    )
    assert [s for s, _ in study_trials(root, name)] == ["RUNNING", "PRUNED"]
    resumed_to_the_end(root, name, cmd, 2)
    check_packed_stop(root, name, epochs=8)


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_pack_that_fails_for_good_keeps_its_stopped_member_pruned(
    ray_session, project: Path
) -> None:
    """No retries left when the pack's worker dies after member 1's stop: member 0 is
    FAILED, member 1 stays PRUNED in Optuna and KILLED + tagged in MLflow (not FAILED),
    and the audit agrees."""
    space = load_space(DEMO, [*PACKED, LONG, "budget.max_failures=0"])
    with Injector(kill_the_pack_after_a_stop(project, "pfail", [])):
        run_sweep(space, SweepOptions(name="pfail", progress=False))
    study = optuna.load_study(study_name="pfail", storage=ProjectPaths.resolve(project).optuna_url)
    failed, stopped = study.trials
    assert (failed.state, stopped.state) == (TrialState.FAIL, TrialState.PRUNED)
    records = SweepRecords.load(ProjectPaths.resolve(project).tracking_uri, "pfail")
    runs = {n: records.client.get_run(r) for n, r in records.runs.items()}
    assert runs[failed.number].info.status == "FAILED"
    assert runs[stopped.number].info.status == "KILLED"
    assert runs[stopped.number].data.tags[STOPPED_TAG] == stopped.user_attrs[STOPPED_ATTR]
    report = audit_sweep("pfail", root=project)
    assert report.ok, "\n".join(map(str, report.problems))
