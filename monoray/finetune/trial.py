"""Finetune runs on Ray Train workers: the worker loop and a `TorchTrainer` launcher.

- `worker_loop` is `train_loop_per_worker`: it runs `train_finetune` inside the
  process group Ray Train set up (gloo on CPU, NCCL on GPU), resumes from
  `ray.train.get_checkpoint()` after a worker failure (else from the
  `resume_from` checkpoint it is given), and reports every epoch (rank 0
  attaches the epoch's checkpoint; every rank reports, as Train needs). A
  divergence or bad input is returned (`monoray.runs.outcome.failure_report`,
  Train's `Result.return_value`), not raised, so Train does not restart the
  group to fail again; the Tune trial reports it (one FAILED trial).
- `fit_distributed` builds and runs the `TorchTrainer` (N workers, checkpoints
  in `storage_path/name`, `FailureConfig(max_failures)` worker-group restarts).
  Ray Train V2 restores a run's checkpoints from storage when the same name
  runs again, so a retried Tune trial continues where its workers stopped.

A sweep's Tune trial launches them through `monoray.trials.finetune`.
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
