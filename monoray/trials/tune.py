"""The one Tune function-trial adapter: every kind's trial runs through it.

The kinds' training functions do the work (the same functions `monoray train` and
`monoray finetune` run locally); here we only translate between Tune (config,
checkpoints, `tune.report`) and them, in the trial's own process
(`run_in_process`) or on Ray Train workers the trial launches (`run_on_workers`).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from monoray.errors import InputError
from monoray.runs.outcome import DivergedError, failure_report
from monoray.runs.workers import epoch_report, report_to_tune
from monoray.trials.restore import restore_checkpoint

DRIVER_CPU = 1.0
"""CPUs the Tune trial function holds while its Train workers run (it only waits and relays)."""

OnEpoch = Callable[[int, dict[str, Any], Path | None], None]
Fit = Callable[[Path, Path | None, OnEpoch], dict[str, Any]]
"""`fit(out_dir, resume_from, on_epoch) -> final metrics`: one run of a kind, in process."""
FitWorkers = Callable[..., Any]
"""`fit(*, name, callbacks, **WorkerGroup fields) -> ray.train.Result`: a kind's Train launcher
(`fit_sae_workers`, `fit_distributed`) with the config bound."""


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """The Ray Train workers of each trial of a space: `resources` and `budget.max_failures`."""

    workers: int
    cpu_per_worker: float
    gpu_per_worker: float
    max_failures: int
    """Worker-group restarts from the last checkpoint before the trial fails."""
    storage_path: str
    """Where the trials' Train runs keep their checkpoints."""

    @classmethod
    def of(cls, space: Any, storage: Path) -> WorkerGroup:
        r = space.resources
        return cls(r.workers, r.cpu, r.gpu, space.budget.max_failures, str(storage))


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The training parameters of a Tune config (monoray's bookkeeping keys removed)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def scratch_dir() -> Path:
    """An empty `scratch/` in the trial's own working directory on its node.

    That is Tune's per-trial working dir (in Ray's session dir; not synced to storage
    without `SyncConfig(sync_artifacts=True)`), not `get_trial_dir()`, whose contents Tune
    copies to storage with the experiment state. A killed attempt leaves its scratch
    there, never in the system temp dir; the trial's next attempt clears it first.
    """
    work = Path(tune.get_context().get_storage().trial_working_directory) / "scratch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def run_in_process(fit: Fit, epochs: int) -> None:
    """Train in the trial's process, report every epoch with its checkpoint."""
    work = scratch_dir()
    # Retry after a crash: continue from the newest intact checkpoint Tune persisted.
    resume_from, resumed_epoch = restore_checkpoint(work / "restored")

    def on_epoch(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        assert checkpoint_dir is not None  # a single process is rank 0
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        tune.report(
            epoch_report(epoch, metrics, checkpoint_dir, resumed_epoch), checkpoint=checkpoint
        )

    try:
        final = fit(work / "run", resume_from, on_epoch)
        if resumed_epoch >= epochs:
            # Restored at its last epoch (the driver died as the trial ended): nothing was
            # trained, so report the final result again; it ends the trial like any other.
            tune.report(epoch_report(resumed_epoch, final, None, resumed_epoch))
    except (DivergedError, InputError) as err:
        # A finished result without objectives: the searcher tells Optuna FAIL and the
        # tracker marks the MLflow run FAILED; Tune does not retry (it would fail the same).
        tune.report(failure_report(err, rank=0))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_on_workers(fit: FitWorkers, group: WorkerGroup) -> None:
    """Train on Ray Train workers; every epoch's metrics are forwarded to Tune as they come."""
    from ray.tune.integration.ray_train import TuneReportCallback

    result = fit(
        name=f"trial-{tune.get_context().get_trial_id()}",
        callbacks=[TuneReportCallback()],
        **{f.name: getattr(group, f.name) for f in dataclasses.fields(group)},
    )
    report_to_tune(result)


def with_resources(fn: Any, space: Any, *, on_workers: bool) -> Any:
    """`fn` with the trial's own resources: the whole `resources` in process, else
    `DRIVER_CPU` (the workers hold `resources.cpu` / `gpu` each)."""
    r = space.resources
    own = {"cpu": DRIVER_CPU, "gpu": 0} if on_workers else {"cpu": r.cpu, "gpu": r.gpu}
    return tune.with_resources(fn, own)


def demand(space: Any, *, on_workers: bool) -> tuple[float, float]:
    """(CPUs, GPUs) one trial occupies: its workers plus the trial function, or `resources`."""
    r = space.resources
    if not on_workers:
        return r.cpu, r.gpu
    return DRIVER_CPU + r.workers * r.cpu, r.workers * r.gpu
