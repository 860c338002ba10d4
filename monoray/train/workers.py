"""SAE runs on W Ray Train workers: the worker loop and the `TorchTrainer` launcher.

The model is the finetune multi-worker path (`monoray.finetune.trial`):

- `sae_worker_loop` is `train_loop_per_worker`: every worker opens the data
  itself (a feature store is memory-mapped, so a worker reads only its rows),
  resumes from `ray.train.get_checkpoint()` after a worker failure and runs
  `train_sae(..., collective=Ranks())` in the process group Ray Train set up
  (gloo on CPU, NCCL on GPU); rank 0 attaches each epoch's checkpoint, every
  rank reports, as Train needs.
- `fit_sae_workers` builds and runs the `TorchTrainer` (checkpoints in
  `storage_path/name`; `FailureConfig(max_failures)` restarts the worker
  group from the last checkpoint).

A sweep's Tune trial launches them through `monoray.trials.sae`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monoray.errors import InputError
from monoray.train.config import TrainConfig


def data_spec(
    features: str | Path,
    val_features: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    subset: int | None = None,
    zero_rows: str = "keep",
) -> dict[str, Any]:
    """How workers open the data: absolute paths (Train workers run in their own cwd)."""

    def absolute(p: str | Path | None) -> str | None:
        if p is None or str(p) == "digits":
            return None if p is None else "digits"
        return str(Path(p).expanduser().resolve())

    return {
        "features": absolute(features),
        "val_features": absolute(val_features),
        "seed": seed,
        "val_fraction": val_fraction,
        "subset": subset,
        "zero_rows": zero_rows,
    }


def open_data(spec: dict[str, Any], d_in: int | None = None) -> Any:
    """The `FeatureSplits` of a `data_spec` (memory-mapped for a feature store)."""
    from monoray.data import load_features

    splits = load_features(
        spec["features"],
        val_source=spec["val_features"],
        seed=spec["seed"],
        val_fraction=spec["val_fraction"],
        d_in=d_in,
        zero_rows=spec["zero_rows"],
    )
    return splits if spec["subset"] is None else splits.head(spec["subset"])


def check_workers(
    cfg: TrainConfig, n_train: int, *, workers: int, gpu_per_worker: float, where: str
) -> None:
    """Bad input before anything starts: shards, and a CUDA device without GPUs per worker."""
    from monoray.train.distributed import check_shards

    check_shards(n_train, cfg.batch_size, workers, where=where)
    if cfg.device.startswith("cuda") and gpu_per_worker <= 0:
        raise InputError(
            f"device {cfg.device} (NCCL) needs a GPU per Train worker: "
            "give --gpus-per-worker / resources.gpu, or device cpu"
        )


def check_placement(
    workers: int, cpu_per_worker: float, gpu_per_worker: float, extra_cpu: float = 0.0
) -> None:
    """Raise `InputError` if the connected Ray cluster cannot place the workers at once."""
    import ray

    total = ray.cluster_resources()
    for key, wanted in (
        ("CPU", extra_cpu + workers * cpu_per_worker),
        ("GPU", workers * gpu_per_worker),
    ):
        have = float(total.get(key, 0.0))
        if wanted > have:
            raise InputError(
                f"{workers} workers need {wanted:g} {key} but the Ray cluster has {have:g}: "
                f"use fewer workers or a larger cluster"
            )


def sae_worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """`train_loop_per_worker`: config = {"train": flat TrainConfig, "data": data_spec,
    "out_dir": rank 0's run directory or None, "resume_from": a checkpoint or None}.

    Returns this rank's `failure_report` of a divergence or bad input (the run
    contract, `monoray.runs.outcome`), else None."""
    import ray.train
    import ray.train.torch
    import torch

    from monoray.errors import InputError
    from monoray.runs.outcome import DivergedError, failure_report
    from monoray.runs.workers import checkpoint_epoch, epoch_report, write_status
    from monoray.sae.collective import Ranks
    from monoray.train.trainer import train_sae

    cfg = TrainConfig.from_dict(config["train"])
    rank = ray.train.get_context().get_world_rank()
    device = torch.device("cpu") if cfg.device == "cpu" else ray.train.torch.get_device()
    if device.type == "cuda":
        cfg = TrainConfig.from_dict({**config["train"], "device": str(device)})
    try:
        splits = open_data(config["data"], d_in=cfg.sae.d_in)
    except InputError as err:  # every rank reads the same data: all fail together
        return failure_report(err, rank)
    work = Path(tempfile.mkdtemp(prefix=f"monoray-sae-rank{rank}-"))
    out_dir = Path(config["out_dir"]) if config.get("out_dir") and rank == 0 else work / "run"
    resume_from = config.get("resume_from")
    resumed = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory(str(work / "restored")))
        resumed = checkpoint_epoch(resume_from)
    status_dir = config.get("status_dir")
    write_status(status_dir, rank, epoch=resumed, resumed_from_epoch=resumed)

    def on_epoch(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        report = epoch_report(epoch, metrics, checkpoint_dir, resumed)
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if status_dir is not None:  # after Train registered the report (see finetune.trial)
            ray.train.get_all_reported_checkpoints()
            write_status(status_dir, rank, epoch=epoch, resumed_from_epoch=resumed)

    try:
        train_sae(
            cfg,
            splits,
            out_dir=out_dir,
            resume_from=resume_from,
            on_epoch=on_epoch,
            progress=False,
            collective=Ranks(device=device),
        )
    except (DivergedError, InputError) as err:
        return failure_report(err, rank)  # every rank gets here together (all-reduced checks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return None


def fit_sae_workers(
    cfg: TrainConfig,
    data: dict[str, Any],
    *,
    workers: int,
    storage_path: str | Path,
    name: str,
    cpu_per_worker: float = 1.0,
    gpu_per_worker: float = 0.0,
    max_failures: int = 2,
    callbacks: Sequence[Any] = (),
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    status_dir: str | Path | None = None,
) -> Any:
    """Train `cfg` on `workers` Ray Train workers; returns the `ray.train.Result`.

    `out_dir`: rank 0's run directory (else a temporary one); `resume_from`: a
    checkpoint (directory of them) to start from when Train has none of its own;
    `status_dir`: each rank's pid and last registered epoch (`rank-R.json`).
    """
    from monoray.runs.workers import fit_torch_workers

    loop_config = {
        "train": cfg.to_dict(),
        "data": data,
        "out_dir": None if out_dir is None else str(out_dir),
        "resume_from": None if resume_from is None else str(resume_from),
        "status_dir": None if status_dir is None else str(status_dir),
    }
    return fit_torch_workers(
        sae_worker_loop,
        loop_config,
        workers=workers,
        storage_path=storage_path,
        name=name,
        cpu_per_worker=cpu_per_worker,
        gpu_per_worker=gpu_per_worker,
        max_failures=max_failures,
        callbacks=callbacks,
    )


def run_workers(cfg: TrainConfig, data: dict[str, Any], splits: Any, args: Any) -> dict[str, float]:
    """`monoray train --workers W`: the run directory ends as an in-process run's (rank 0
    writes `checkpoints/`, `metrics.json`, the profile and `sae/`), so W' workers or a local run
    can `--resume` it. A failure on any rank ends the run as `check_outcome` says
    (divergence: exit 3, bad input: 2, anything else: 1; one line each)."""
    import ray.train

    from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint
    from monoray.runs.cluster import start_ray
    from monoray.runs.outcome import METRICS_FILE, RunFailedError, check_outcome, write_outputs
    from monoray.train.artifact import sae_of_checkpoint, write_run_sae
    from monoray.train.evaluate import EvalResult

    where = str(data["features"])
    check_workers(
        cfg,
        len(splits.train),
        workers=args.workers,
        gpu_per_worker=args.gpus_per_worker,
        where=where,
    )
    out: Path = args.out.resolve()
    if not args.resume and (out / CHECKPOINTS).exists():
        raise InputError(f"{out}/: holds a run already; pass --resume to continue it")
    spec = data_spec(
        data["features"],
        data["val_features"],
        seed=data["seed"],
        val_fraction=data["val_fraction"],
        zero_rows=data["zero_rows"],
    )
    start_ray(args.address)
    check_placement(args.workers, 1.0, args.gpus_per_worker)
    resume_from, name = None, "train"
    last = load_checkpoint(out / CHECKPOINTS, with_optimizer=False) if args.resume else None
    if last is not None:
        # A Train run of its own: Train would otherwise restore its older checkpoints of an
        # earlier run (say epoch 1 at W = 2) over a newer local one (epoch 2 at W = 1).
        resume_from, name = out / CHECKPOINTS, f"train-from-epoch-{last.epoch:04d}"
    try:
        result = fit_sae_workers(
            cfg,
            spec,
            workers=args.workers,
            storage_path=out / "ray",
            name=name,
            gpu_per_worker=args.gpus_per_worker,
            out_dir=out,
            resume_from=resume_from,
            status_dir=out / "workers",
        )
        report, error = result.return_value, result.error
    except ray.train.TrainingFailedError as err:
        result, report, error = None, None, err
    check_outcome(report, error)  # a failure on any rank: one line, exit 3 / 2 / 1
    assert result is not None
    if not (out / METRICS_FILE).exists() and result.checkpoint is not None:  # rank 0 elsewhere
        ckpt = load_checkpoint(result.checkpoint.path, with_optimizer=False)
        if ckpt is not None:
            final = ckpt.history[-1]
            write_outputs(out, final, EvalResult.from_tensors(final, ckpt.eval_tensors).monoscore)
            sae = sae_of_checkpoint(ckpt).sae
            write_run_sae(out, sae, cfg, splits.header, epoch=ckpt.epoch, data=ckpt.data)
    final_ckpt = load_checkpoint(out / CHECKPOINTS, with_optimizer=False)
    if final_ckpt is None:
        raise RunFailedError("the workers finished without a checkpoint")
    return final_ckpt.history[-1]
