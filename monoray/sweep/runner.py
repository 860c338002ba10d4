"""Run a sweep: Ray Tune + OptunaSearch over an RDB study, tracked in MLflow.

    space (YAML) -> the kind's pre-flight (SAE: features, once, into the object store)
    -> Tuner(the kind's trainable, MonorayOptunaSearch, MlflowTracker) -> Pareto front
    -> MLflow artifacts

Resume (`--resume`) restores the Tune experiment, the searcher and the study;
Optuna trials the driver handed out but Tune never saved go back to WAITING and
are reused, MLflow runs are found again by Optuna trial number.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import ray
from ray import tune

from monoray.data import FeatureSplits
from monoray.errors import InputError
from monoray.runs.cluster import start_ray
from monoray.runs.verbosity import tune_verbose
from monoray.sweep.moasha import build_scheduler
from monoray.sweep.pack_fit import pack_sizing
from monoray.sweep.pareto import ParetoReport, publish_pareto
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.progress import SweepProgress
from monoray.sweep.search import (
    FAIL_ATTR,
    MonorayOptunaSearch,
    StudyBoundSearch,
    fail_leftovers,
    n_created,
    open_study,
    release_orphans,
    storage_for,
)
from monoray.sweep.space import SweepSpace
from monoray.sweep.tracking import MlflowTracker, artifact_root_for
from monoray.sweep.views import dataset_inputs

DRY_RUN_SAMPLES = 256


@dataclass(frozen=True, slots=True)
class SweepOptions:
    """How and where to run a space (the CLI flags)."""

    name: str | None = None
    resume: bool = False
    address: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    root: str | None = None
    dry_run: bool = False
    progress: bool = True


@dataclass(frozen=True, slots=True)
class SweepResult:
    name: str
    study_name: str
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    n_complete: int
    n_failed: int
    n_pruned: int
    """Stopped early by the scheduler (`scheduler: {type: mo_asha}`)."""
    interrupted: bool
    pareto: ParetoReport | None
    ray_dir: Path
    fit_s: float
    """Wall time of `Tuner.fit` (all trials)."""
    publish_s: float
    """Wall time of the end-of-sweep work (Pareto table, plots, registry)."""
    pack_sizing: str | None = None
    """Dry runs of SAE spaces: how many packed members fit the local GPU (`pack_fit`)."""


def dry_run_space(space: SweepSpace) -> SweepSpace:
    """Two trials, one epoch, a small subset: what would break on the cluster breaks here."""
    subset = min(space.data.subset or DRY_RUN_SAMPLES, DRY_RUN_SAMPLES)
    return replace(
        space,
        fixed={**space.fixed, "epochs": 1},
        data=replace(space.data, subset=subset),
        budget=replace(space.budget, num_samples=2, max_concurrent=1, max_failures=0),
    )


def check_resources(space: SweepSpace) -> None:
    total = ray.cluster_resources()
    demand = space.trial_kind.demand(space)  # with Train workers: theirs plus the trial function
    for key, wanted in zip(("cpu", "gpu"), demand, strict=True):
        have = float(total.get(key.upper(), 0.0))
        if wanted > have:
            raise InputError(
                f"{space.path}: resources.{key}: each trial asks for {wanted:g} {key.upper()} "
                f"but the Ray cluster has {have:g}"
            )


def first_failure(grid: tune.ResultGrid, study: optuna.Study) -> str | None:
    """Why a dry run fails: the first trial error's last line, else the first FAIL's reason."""
    for r in grid:
        if r.error is not None:
            return (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1]
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            return t.user_attrs.get(FAIL_ATTR, f"trial {t.number} ended {t.state.name}")
    return None


PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


@contextlib.contextmanager
def _pending_trials(max_concurrent: int) -> Iterator[None]:
    """Let Tune start `max_concurrent` trials at once. Our searcher limits live trials itself,
    not through a `ConcurrencyLimiter`, so Tune's "auto" allows ONE pending trial for it: the
    next trial is only asked for once the last has an actor, and trials shorter than an
    actor's start-up (the demo's) then run one at a time. A value the user set is kept, and
    an unbounded `max_concurrent` (0) keeps Tune's default."""
    if max_concurrent <= 0 or PENDING_TRIALS_ENV in os.environ:
        yield
        return
    os.environ[PENDING_TRIALS_ENV] = str(max_concurrent)
    try:
        yield
    finally:
        os.environ.pop(PENDING_TRIALS_ENV, None)


def run_sweep(space: SweepSpace, opts: SweepOptions) -> SweepResult:
    paths = ProjectPaths.resolve(opts.root)
    name = opts.name or space.name
    if opts.dry_run:
        space = dry_run_space(space)
        paths = ProjectPaths.resolve(tempfile.mkdtemp(prefix="monoray-dryrun-"))
        name = f"dryrun-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir = paths.ray_results / name
    if opts.resume and not tune.Tuner.can_restore(str(exp_dir)):
        raise InputError(f"--resume: no sweep named {name!r} under {paths.ray_results}")
    if not opts.resume and exp_dir.exists():
        raise InputError(
            f"sweep {name!r} already exists in {paths.root}: pass --resume to continue it "
            "or --name to start another"
        )

    kind = space.trial_kind
    prepared = kind.preflight(space)  # bad input fails here, before Ray or any record
    pack_line = pack_sizing(space, prepared) if opts.dry_run and space.kind == "sae" else None
    start_ray(opts.address)  # an unreachable cluster fails here, before anything is created
    paths.ensure()
    storage_url = opts.storage or paths.optuna_url
    tracking_uri = opts.tracking_uri or paths.tracking_uri
    storage = storage_for(storage_url)
    if not opts.resume and name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        raise InputError(f"study {name!r} already exists in {storage_url}: pass --resume or --name")

    # A diverged trial reports no objectives; MonorayOptunaSearch marks it FAIL itself.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Snapshots after every epoch checkpoint are what make --resume exact; don't warn about them.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    check_resources(space)
    study = open_study(space, name, storage)
    tracker = MlflowTracker(
        tracking_uri,
        name,
        space=space.to_dict(),
        metrics=space.metric_names,
        artifact_root=artifact_root_for(tracking_uri, paths.artifacts),
        storage_url=storage_url,
        # An SAE kind's pre-flight hands over the loaded splits: they are every run's input.
        datasets=dataset_inputs(prepared) if isinstance(prepared, FeatureSplits) else None,
    )
    progress = SweepProgress(
        space.budget.num_samples,
        space.metric_names,
        space.modes,
        space.constraints,
        enabled=opts.progress,
    )
    # Train runs (trials on Ray Train workers) persist next to the Tune trials.
    trainable = kind.trainable(space, prepared, exp_dir / "train-runs")

    if opts.resume:
        tracker.open_parent()
        known = {t.trial_id for t in tune.ExperimentAnalysis(str(exp_dir)).trials}
        release_orphans(study, storage, known)
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable, resume_errored=True, param_space=dict(space.fixed)
        )
    else:
        scheduler, stop_callbacks = build_scheduler(space, exp_dir, name, storage_url)
        tuner = tune.Tuner(
            trainable,
            param_space=dict(space.fixed),
            tune_config=tune.TuneConfig(
                search_alg=StudyBoundSearch(MonorayOptunaSearch(space, name, storage)),
                scheduler=scheduler,
                num_samples=-1,  # the searcher ends the search once the study holds the budget
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(paths.ray_results),
                callbacks=[*stop_callbacks, tracker, progress],
                failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=tune_verbose(),
            ),
        )
    fit_start = time.perf_counter()
    with _pending_trials(space.budget.max_concurrent):
        grid = tuner.fit()
    fit_s = time.perf_counter() - fit_start
    publish_start = time.perf_counter()
    tracker.open_parent()  # the driver-side tracker (Tune ran a restored copy on resume)
    study = optuna.load_study(study_name=name, storage=storage)
    # Interrupted (Ctrl-C, a stop signal) iff Tune's final snapshot has a trial neither
    # TERMINATED nor ERROR, or the study holds fewer handed-out trials than the budget;
    # not from what results hold, nor from how many trials Tune's snapshot kept.
    interrupted = (
        grid.num_terminated + grid.num_errors < len(grid)
        or n_created(study) < space.budget.num_samples
    )
    if not interrupted:
        fail_leftovers(study, storage, "left RUNNING when the sweep ended")
    states = [t.state for t in study.trials]
    pareto = None
    if not interrupted:
        pareto = publish_pareto(study, tracker.records(), out_dir=paths.sweep_dir(name), sweep=name)
        tracker.finish_parent("FINISHED")
    else:
        tracker.finish_parent("KILLED")
    if opts.dry_run:
        failure = first_failure(grid, study)
        if failure is not None:
            raise InputError(f"dry run: a trial failed: {failure}")
    return SweepResult(
        name=name,
        study_name=name,
        storage_url=storage_url,
        tracking_uri=tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=tracker.parent_run_id,
        n_complete=sum(s == optuna.trial.TrialState.COMPLETE for s in states),
        n_failed=sum(s == optuna.trial.TrialState.FAIL for s in states),
        n_pruned=sum(s == optuna.trial.TrialState.PRUNED for s in states),
        interrupted=interrupted,
        pareto=pareto,
        ray_dir=exp_dir,
        fit_s=fit_s,
        publish_s=time.perf_counter() - publish_start,
        pack_sizing=pack_line,
    )
