"""Finetune trials on Ray: the Train worker loop, a `TorchTrainer` launcher, the Tune function trial.

- `worker_loop` is `train_loop_per_worker`: it runs `train_finetune` inside the
  process group Ray Train set up (gloo on CPU, NCCL on GPU), resumes from
  `ray.train.get_checkpoint()` after a worker failure (else from the
  `resume_from` checkpoint it is given), and reports every epoch (rank 0
  attaches the epoch's checkpoint; every rank reports, as Train needs). A
  divergence or bad input is returned (`monoray.runs.outcome.failure_report`,
  Train's `Result.return_value`), not raised, so Train does not restart the
  group to fail again; `finetune_trial` reports it to Tune (one FAILED trial).
- `fit_distributed` builds and runs the `TorchTrainer` (N workers, checkpoints
  in `storage_path/name`, `FailureConfig(max_failures)` worker-group restarts).
  Ray Train V2 restores a run's checkpoints from storage when the same name
  runs again, so a retried Tune trial continues where its workers stopped.
- `finetune_trial` is the Tune function trainable: with `workers == 0` it
  trains in the trial's own process and reports to Tune directly; with
  `workers >= 1` it runs `fit_distributed` with `TuneReportCallback`, which
  forwards every epoch's metrics to Tune, then reports the final checkpoint
  (so the MLflow tracker and Pareto code see it as for SAE trials).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monoray.finetune.config import FinetuneConfig
from monoray.runs.workers import (
    checkpoint_epoch,
    epoch_report,
    fit_torch_workers,
    report_to_tune,
    write_status,
)


def worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """`train_loop_per_worker`; returns this rank's `failure_report` of a divergence or bad input, else None.

    config = {"finetune": flat FinetuneConfig, "status_dir": str | None,
    "resume_from": checkpoint dir | None (used when Train restores nothing)}.
    """
    import ray.train
    import ray.train.torch

    from monoray.errors import InputError
    from monoray.finetune.loop import train_finetune
    from monoray.runs.outcome import DivergedError, failure_report

    cfg = FinetuneConfig.from_dict(config["finetune"])
    status_dir = config.get("status_dir")
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if cfg.device == "cpu":
        import torch

        device = torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix=f"monoray-finetune-rank{rank}-"))
    resume_from = config.get("resume_from")
    resumed = 0 if resume_from is None else checkpoint_epoch(Path(resume_from))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory(str(work / "restored")))
        resumed = checkpoint_epoch(resume_from)
    write_status(status_dir, rank, epoch=resumed, resumed_from_epoch=resumed)

    def on_epoch(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        report = epoch_report(epoch, metrics, checkpoint_dir, resumed)
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if status_dir is not None:
            # Blocks until Train has registered the report: a status file's epoch is then
            # a checkpoint that a restarted worker group resumes from.
            ray.train.get_all_reported_checkpoints()
            write_status(status_dir, rank, epoch=epoch, resumed_from_epoch=resumed)

    try:
        train_finetune(
            cfg, out_dir=work / "run", resume_from=resume_from, on_epoch=on_epoch, device=device
        )
    except (DivergedError, InputError) as err:
        return failure_report(err, rank)  # every rank gets here together (all-reduced checks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return None


def fit_distributed(
    cfg: FinetuneConfig,
    *,
    workers: int,
    storage_path: str | Path,
    name: str,
    cpu_per_worker: float = 1.0,
    gpu_per_worker: float = 0.0,
    max_failures: int = 2,
    callbacks: Sequence[Any] = (),
    status_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> Any:
    """Run `cfg` on `workers` Ray Train workers; returns the `ray.train.Result`.

    Checkpoints go to `storage_path/name` (a run of the same name resumes from
    them; a new one starts from the checkpoint directory `resume_from`, if
    given); a failed worker group restarts up to `max_failures` times from the
    last checkpoint. Raises Train's `TrainingFailedError` once the restarts
    are spent; `monoray.runs.outcome.check_outcome` turns it, or the workers'
    `Result.return_value`, into the run's outcome.
    """
    from monoray.errors import InputError

    if cfg.device.startswith("cuda") and gpu_per_worker <= 0:
        raise InputError(
            f"device {cfg.device} needs a GPU per Train worker (--gpus-per-worker / resources.gpu)"
        )
    loop_config = {
        "finetune": cfg.to_dict(),
        "status_dir": None if status_dir is None else str(status_dir),
        "resume_from": None if resume_from is None else str(resume_from),
    }
    return fit_torch_workers(
        worker_loop,
        loop_config,
        workers=workers,
        storage_path=storage_path,
        name=name,
        cpu_per_worker=cpu_per_worker,
        gpu_per_worker=gpu_per_worker,
        max_failures=max_failures,
        callbacks=callbacks,
    )


def finetune_trial(
    config: dict[str, Any],
    *,
    data: dict[str, Any],
    storage: str,
    workers: int,
    cpu_per_worker: float,
    gpu_per_worker: float,
    max_failures: int,
) -> None:
    """Tune function trainable of a `kind: finetune` space.

    `data` holds the space's data keys (images, embeddings, subset), `storage`
    the directory of the trials' Train runs.
    """
    from ray import tune

    from monoray.sweep.trial import trial_params

    cfg = FinetuneConfig.from_dict({**trial_params(config), **data})
    if workers == 0:
        _in_process(cfg)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    result = fit_distributed(
        cfg,
        workers=workers,
        storage_path=storage,
        name=f"trial-{tune.get_context().get_trial_id()}",
        cpu_per_worker=cpu_per_worker,
        gpu_per_worker=gpu_per_worker,
        max_failures=max_failures,
        callbacks=[TuneReportCallback()],
    )
    report_to_tune(result)


def _in_process(cfg: FinetuneConfig) -> None:
    from ray import tune

    from monoray.finetune.loop import train_finetune
    from monoray.runs.outcome import DivergedError, failure_report
    from monoray.sweep.restore import restore_checkpoint
    from monoray.sweep.trial import scratch_dir

    work = scratch_dir()
    # Retry after a crash: continue from the newest intact checkpoint Tune persisted.
    resume_from, resumed = restore_checkpoint(work / "restored")

    def on_epoch(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        report = epoch_report(epoch, metrics, checkpoint_dir, resumed)
        assert checkpoint_dir is not None  # a single process is rank 0
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    try:
        train_finetune(cfg, out_dir=work / "run", resume_from=resume_from, on_epoch=on_epoch)
    except DivergedError as err:
        tune.report(failure_report(err, rank=0))
    finally:
        shutil.rmtree(work, ignore_errors=True)


DRIVER_CPU = 1.0
"""CPUs the Tune trial function holds while its Train workers run (it only waits and relays)."""


def space_data(space: Any) -> dict[str, Any]:
    """The finetune config keys a space's `data` section sets (images, embeddings, subset)."""
    return {
        "images": space.data.features,
        "embeddings": space.data.embeddings,
        "subset": space.data.subset,
    }


def check_finetune_space(space: Any) -> None:
    """Fail before anything starts: every extreme search point builds, and the data opens."""
    from monoray.errors import InputError
    from monoray.finetune.backbones import CACHE
    from monoray.finetune.data import open_finetune_data
    from monoray.sweep.space import check_extreme_points

    data = space_data(space)
    if space.data.val_features is not None:
        raise InputError(
            f"{space.path}: data.val_features: finetune spaces take their val split from "
            "data.features (digits split, CIFAR test split, ImageFolder val/)"
        )
    weights = space.fixed.get("weights")
    if isinstance(weights, str) and weights != CACHE and not Path(weights).is_absolute():
        raise InputError(
            f"{space.path}: fixed.weights: {weights} is relative; trials run in their own "
            "directories: give an absolute path (or --set fixed.weights=PATH) or 'cache'"
        )
    check_extreme_points(space, lambda params: FinetuneConfig.from_dict({**params, **data}))
    open_finetune_data(data["images"], data["embeddings"], subset=data["subset"])


def trial_demand(space: Any) -> tuple[float, float]:
    """(CPUs, GPUs) one trial of the space occupies: its workers plus the trial function."""
    r = space.resources
    if r.workers == 0:
        return r.cpu, r.gpu
    return DRIVER_CPU + r.workers * r.cpu, r.workers * r.gpu


def finetune_trainable(space: Any, *, storage: Path) -> Any:
    """The Tune trainable of a finetune space, with its resources.

    `resources.cpu` / `gpu` are per Train worker when `resources.workers >= 1`
    (the trial function then holds `DRIVER_CPU`), per trial otherwise.
    """
    from ray import tune

    r = space.resources
    fn = tune.with_parameters(
        finetune_trial,
        data=space_data(space),
        storage=str(storage),
        workers=r.workers,
        cpu_per_worker=r.cpu,
        gpu_per_worker=r.gpu,
        max_failures=space.budget.max_failures,
    )
    own = {"cpu": r.cpu, "gpu": r.gpu} if r.workers == 0 else {"cpu": DRIVER_CPU, "gpu": 0}
    return tune.with_resources(fn, own)
