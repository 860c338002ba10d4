"""The Tune function trial: one SAE training run, reported epoch by epoch.

This is a thin adapter: `monoray.train.train_sae` does the work (the same
function `monoray train` runs locally); here we only translate between Tune
(config, checkpoints, `tune.report`) and the trainer. The feature splits come
through `tune.with_parameters`, i.e. from Ray's object store, put there once by
the driver and shared zero-copy by every trial on a node.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ray import tune

from monoray.data import FeatureSplits
from monoray.errors import InputError
from monoray.runs.outcome import failure_report
from monoray.runs.workers import epoch_report
from monoray.sweep.restore import restore_checkpoint, restored_metrics


def config_keys(kind: str) -> set[str]:
    """Parameter names a trial of this kind accepts in `fixed` and `search`."""
    if kind == "sae":
        from monoray.train.config import TrainConfig

        return set(TrainConfig.allowed_keys())
    if kind == "finetune":
        from monoray.finetune.config import DATA_KEYS, FinetuneConfig

        return set(FinetuneConfig.allowed_keys()) - set(DATA_KEYS)
    raise InputError(f"kind: {kind!r} trials are not available (use kind: sae or finetune)")


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The training parameters of a Tune config (monoray's bookkeeping keys removed)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def sae_trial(config: dict[str, Any], splits: FeatureSplits) -> None:
    """Tune function trainable: train, report every epoch with its checkpoint."""
    from monoray.train import DivergedError, TrainConfig, train_sae

    cfg = TrainConfig.from_dict({**trial_params(config), "d_in": splits.train.dim})
    work = scratch_dir()
    # Retry after a crash: continue from the newest intact checkpoint Tune persisted.
    resume_from, resumed_epoch = restore_checkpoint(work / "restored")

    def on_epoch(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        tune.report(
            epoch_report(epoch, metrics, checkpoint_dir, resumed_epoch), checkpoint=checkpoint
        )

    try:
        if resume_from is not None:
            # Restored (a retry, or --resume after a driver kill): report the checkpoint's
            # epoch again before training on, so the scheduler judges the trial there (a stop
            # decided at that epoch stands before another epoch is trained) and a trial
            # restored at its last epoch ends with its final result. The tracker drops the
            # repeated epoch.
            metrics = restored_metrics(resume_from)
            tune.report(epoch_report(resumed_epoch, metrics, None, resumed_epoch))
        train_sae(
            cfg,
            splits,
            out_dir=work / "run",
            resume_from=resume_from,
            on_epoch=on_epoch,
            progress=False,
        )
    except (DivergedError, InputError) as err:
        # A finished result without objectives: the searcher tells Optuna FAIL and the
        # tracker marks the MLflow run FAILED; Tune does not retry (it would fail the same).
        tune.report(failure_report(err, rank=0))
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
