"""Does a finished sweep's record agree with itself? Optuna study vs MLflow runs vs checkpoints.

A sweep writes three records: the Optuna study (RDB), the MLflow experiment
(a parent run and one nested run per Optuna trial number) and the Tune
checkpoints (persisted per trial under `<root>/ray/<sweep>/`, the final one
also copied into the MLflow run). `audit_sweep` reads all three back and lists
every disagreement:

- the study holds exactly the budget's number of trials, all finished
  (COMPLETE with finite objective values, PRUNED: stopped early by MO-ASHA, or
  FAIL); none RUNNING or WAITING;
- exactly one MLflow trial run per Optuna trial number, none extra, each a
  child of the parent run, FINISHED for COMPLETE, KILLED (tagged
  `monoray.stopped`) for PRUNED and FAILED for FAIL; the parent FINISHED; no
  run left RUNNING;
- per run, the `epoch` and objective metrics have one value per step (no
  duplicates after retries or `--resume`) and no missing step; the parent's summary
  metrics (hypervolume series, counts) one value per step; a COMPLETE
  trial's last logged objectives equal the study's values;
- a COMPLETE (or PRUNED) trial's MLflow checkpoint and its newest Tune
  checkpoint both verify against their sha256, hold its last logged epoch (the
  stop epoch of a PRUNED one), and are the same model.

The budget and objectives come from the space stored with the parent run, so
`monoray audit NAME` needs nothing but the sweep's name (and its root).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from monoray.errors import InputError
from monoray.runs.checkpoint import read_checkpoint_dir
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.search import STOPPED_VALUES_ATTR, TRIAL_KEY, redact, storage_for
from monoray.sweep.tracking import (
    ROLE_TAG,
    STOPPED_TAG,
    TRIAL_TAG,
    client_for,
    experiment_name,
    find_parent,
    trial_runs,
)

ProblemKind = Literal["lost", "duplicate", "running", "mismatch", "damaged"]
_TUNE_CHECKPOINT = re.compile(r"^checkpoint_(\d{6,})$")
_RUN_STATUS = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.FAIL: "FAILED",
    TrialState.PRUNED: "KILLED",  # stopped early by MO-ASHA (tag monoray.stopped)
}
_CHECKED = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials whose checkpoints must hold their last logged epoch."""


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    """lost: a record that should exist does not; duplicate: one too many; running: left
    unfinished; mismatch: two records disagree; damaged: a checkpoint fails its checksum."""
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(slots=True)
class AuditReport:
    sweep: str
    budget: int
    n_trials: int = 0
    n_complete: int = 0
    n_failed: int = 0
    n_pruned: int = 0
    """Stopped early by MO-ASHA: expected, not a problem."""
    n_runs: int = 0
    n_metric_steps: int = 0
    """Logged (run, metric, step) values checked."""
    n_checkpoints: int = 0
    """Checkpoints whose sha256 was verified (MLflow copies and Tune's own)."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def records_lost(self) -> int:
        return sum(p.kind == "lost" for p in self.problems)

    def add(self, kind: ProblemKind, message: str) -> None:
        self.problems.append(Problem(kind, message))

    def summary(self) -> str:
        return (
            f"sweep {self.sweep}: {self.n_trials}/{self.budget} trials "
            f"({self.n_complete} complete, {self.n_pruned} stopped early, {self.n_failed} failed), "
            f"{self.n_runs} MLflow runs, "
            f"{self.n_metric_steps} metric steps, {self.n_checkpoints} checkpoints verified, "
            f"{len(self.problems)} problems"
        )


def audit_sweep(
    name: str,
    *,
    root: str | Path | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> AuditReport:
    """Compare the study, the MLflow runs and the checkpoints of sweep `name`.

    Raises `InputError` when the sweep has no study or no MLflow parent run at all.
    """
    paths = ProjectPaths.resolve(root)
    if storage is None and not (paths.root / "optuna.db").is_file():
        raise InputError(f"no sweeps in {paths.root} (no optuna.db); pass --root or --storage")
    storage_url = storage or paths.optuna_url
    try:
        study = optuna.load_study(study_name=name, storage=storage_for(storage_url))
    except KeyError:
        raise InputError(f"no sweep named {name!r} in {redact(storage_url)}") from None
    client = client_for(tracking_uri or paths.tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(name))
    parent = find_parent(client, experiment.experiment_id) if experiment else None
    if experiment is None or parent is None:
        raise InputError(f"no MLflow records of sweep {name!r} in {redact(client.tracking_uri)}")
    with tempfile.TemporaryDirectory(prefix="monoray-audit-") as tmp:
        space_file = _artifact(client, client.get_run(parent), "space.json", Path(tmp))
        space = json.loads(space_file.read_text())
        report = AuditReport(name, budget=int(space["budget"]["num_samples"]))
        objectives = [o["metric"] for o in space["objectives"]]
        trials = study.get_trials(deepcopy=False)
        _audit_study(report, trials)
        runs = _audit_runs(report, client, experiment.experiment_id, parent, trials)
        _audit_parent_metrics(report, client, parent)
        final_epochs = {
            t.number: _audit_metrics(report, client, runs[t.number], t, objectives)
            for t in trials
            if t.number in runs
        }
        tune_checkpoints = _tune_checkpoints(paths.ray_results / name)
        for t in trials:
            if t.state in _CHECKED and t.number in runs:
                _audit_checkpoints(
                    report,
                    client,
                    runs[t.number],
                    t.number,
                    final_epochs[t.number],
                    tune_checkpoints.get(t.number, []),
                    Path(tmp) / str(t.number),
                )
    return report


def _artifact(client: MlflowClient, run: Any, path: str, tmp: Path) -> Path:
    """A run's artifact on local disk: read in place from a file store, else downloaded."""
    uri = urlparse(run.info.artifact_uri)
    if uri.scheme in ("", "file"):
        return Path(url2pathname(uri.path)) / path
    tmp.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run.info.run_id, path, str(tmp)))


def _audit_study(report: AuditReport, trials: list[FrozenTrial]) -> None:
    report.n_trials = len(trials)
    report.n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    report.n_failed = sum(t.state == TrialState.FAIL for t in trials)
    report.n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    if len(trials) < report.budget:
        report.add("lost", f"study has {len(trials)} trials, the budget is {report.budget}")
    elif len(trials) > report.budget:
        report.add("duplicate", f"study has {len(trials)} trials, the budget is {report.budget}")
    for t in trials:
        if t.state not in _RUN_STATUS:
            report.add("running", f"Optuna trial {t.number} is {t.state.name}")
        elif t.state == TrialState.COMPLETE and not all(map(math.isfinite, t.values or [])):
            report.add("mismatch", f"Optuna trial {t.number} is COMPLETE with values {t.values}")


def _audit_runs(
    report: AuditReport,
    client: MlflowClient,
    experiment_id: str,
    parent: str,
    trials: list[FrozenTrial],
) -> dict[int, Any]:
    status = client.get_run(parent).info.status
    if status != "FINISHED":
        report.add("running" if status == "RUNNING" else "mismatch", f"parent run is {status}")
    parents = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=10
    )
    if len(parents) > 1:
        report.add("duplicate", f"{len(parents)} parent runs")
    runs: dict[int, Any] = {}
    found = trial_runs(client, experiment_id)
    report.n_runs = len(found)
    for number, count in Counter(int(r.data.tags[TRIAL_TAG]) for r in found).items():
        if count > 1:
            report.add("duplicate", f"{count} MLflow runs for Optuna trial {number}")
    for run in found:
        runs[int(run.data.tags[TRIAL_TAG])] = run
    numbers = {t.number for t in trials}
    for number in sorted(set(runs) - numbers):
        report.add("duplicate", f"MLflow run {runs[number].info.run_id} has no Optuna trial")
    for t in trials:
        run = runs.get(t.number)
        if run is None:
            report.add("lost", f"Optuna trial {t.number} has no MLflow run")
            continue
        if run.data.tags.get("mlflow.parentRunId") != parent:
            report.add("mismatch", f"MLflow run of trial {t.number} is not a child of the parent")
        expected = _RUN_STATUS.get(t.state)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            report.add("running", f"MLflow run of trial {t.number} is {run.info.status}")
        elif expected is not None and run.info.status != expected:
            report.add(
                "mismatch",
                f"trial {t.number} is {t.state.name} in Optuna, {run.info.status} in MLflow",
            )
        elif t.state == TrialState.PRUNED and STOPPED_TAG not in run.data.tags:
            report.add("mismatch", f"trial {t.number} is PRUNED but its run has no {STOPPED_TAG}")
    return runs


def _audit_parent_metrics(report: AuditReport, client: MlflowClient, parent: str) -> None:
    """The summary series (`monoray.sweep.summary`) hold each step once."""
    for key in client.get_run(parent).data.metrics:
        history = client.get_metric_history(parent, key)
        report.n_metric_steps += len(history)
        twice = sorted(s for s, c in Counter(m.step for m in history).items() if c > 1)
        if twice:
            report.add("duplicate", f"parent run: {key} logged twice at steps {twice}")


def _audit_metrics(
    report: AuditReport,
    client: MlflowClient,
    run: Any,
    trial: FrozenTrial,
    objectives: list[str],
) -> int:
    """Check the per-epoch histories of one run; returns its last logged epoch."""
    last_epoch = 0
    for key in ["epoch", *objectives]:
        history = client.get_metric_history(run.info.run_id, key)
        report.n_metric_steps += len(history)
        steps = [m.step for m in history]
        twice = sorted(s for s, c in Counter(steps).items() if c > 1)
        if twice:
            report.add("duplicate", f"trial {trial.number}: {key} logged twice at steps {twice}")
        if set(steps) != set(range(1, max(steps, default=0) + 1)):
            missing = sorted(set(range(1, max(steps) + 1)) - set(steps))
            report.add("lost", f"trial {trial.number}: {key} missing at steps {missing}")
        if key == "epoch":
            last_epoch = max(steps, default=0)
        elif trial.state in _CHECKED:
            final = [m.value for m in history if m.step == last_epoch]
            wanted = _told(trial, len(objectives))[objectives.index(key)]
            if not final:
                report.add("lost", f"trial {trial.number}: no {key} logged at the last epoch")
            elif not math.isclose(final[-1], wanted, rel_tol=1e-9, abs_tol=1e-12):
                report.add(
                    "mismatch",
                    f"trial {trial.number}: {key} is {wanted} in Optuna, {final[-1]} in MLflow",
                )
    if trial.state in _CHECKED and last_epoch == 0:
        report.add("lost", f"trial {trial.number} is {trial.state.name} but logged no epoch")
    return last_epoch


def _told(trial: FrozenTrial, n: int) -> list[float]:
    """The `n` objectives Optuna holds: a PRUNED trial's are its values at the stop epoch
    (NaN if they were not kept, which then shows as a mismatch)."""
    if trial.state == TrialState.PRUNED:
        return [float(v) for v in trial.user_attrs.get(STOPPED_VALUES_ATTR, [])] or [math.nan] * n
    return list(trial.values)


def _tune_checkpoints(exp_dir: Path) -> dict[int, list[Path]]:
    """Tune's persisted checkpoints per Optuna trial number, newest (highest index) first."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for params in exp_dir.glob("*/params.json"):
        number = json.loads(params.read_text()).get(TRIAL_KEY)
        if number is None:
            continue
        for d in params.parent.iterdir():
            m = _TUNE_CHECKPOINT.match(d.name)
            if m and d.is_dir():
                found.setdefault(int(number), []).append((int(m[1]), d))
    return {n: [d for _, d in sorted(dirs, reverse=True)] for n, dirs in found.items()}


def _audit_checkpoints(
    report: AuditReport,
    client: MlflowClient,
    run: Any,
    number: int,
    final_epoch: int,
    tune_dirs: list[Path],
    tmp: Path,
) -> None:
    """The MLflow copy and Tune's newest checkpoint: intact, final epoch, same model."""
    models = []
    if not client.list_artifacts(run.info.run_id, "checkpoint"):
        report.add("lost", f"trial {number}: no checkpoint in its MLflow run")
    else:
        local = _artifact(client, run, "checkpoint", tmp)
        models.append(_verified(report, local, number, final_epoch, "MLflow checkpoint"))
    if not tune_dirs:
        report.add("lost", f"trial {number}: no Tune checkpoint")
    else:
        models.append(_verified(report, tune_dirs[0], number, final_epoch, "Tune checkpoint"))
    if len(models) == 2 and None not in models and models[0] != models[1]:
        report.add("mismatch", f"trial {number}: MLflow and Tune checkpoints differ")


def _verified(report: AuditReport, path: Path, number: int, final_epoch: int, what: str) -> Any:
    """sha256 of the model file if `path` is intact and holds `final_epoch`, else None."""
    try:
        ckpt = read_checkpoint_dir(path, with_optimizer=True)
    except InputError as err:
        report.add("damaged", f"trial {number}: {what}: {err}")
        return None
    report.n_checkpoints += 1
    if ckpt.epoch != final_epoch:
        report.add(
            "mismatch",
            f"trial {number}: {what} holds epoch {ckpt.epoch}, MLflow ends at {final_epoch}",
        )
        return None
    return json.loads((path / "checkpoint.json").read_text())["sha256"]["model.safetensors"]
