"""What every Ray Train / Tune executor of a run shares: the per-epoch report, the
MonoScore profile in each checkpoint, worker status files and the `TorchTrainer` launch.

SAE workers (`monoray.train.workers`), finetune workers (`monoray.finetune.trial`)
and the Tune trials (`monoray.trials.tune`) report and launch through
these, so a trial looks the same to the tracker and the Pareto code whatever ran it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monoray.runs.files import atomic_write_bytes

PROFILE_JSON = "monoscore_profile.json"
"""Per-latent sorted MonoScore, written into each reported checkpoint (read by the Pareto plots)."""


def reportable(value: Any) -> bool:
    """A number Tune, Optuna and MLflow can take (finite, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_report(
    epoch: int, metrics: dict[str, Any], checkpoint_dir: Path | None, resumed_from: int
) -> dict[str, Any]:
    """The numbers reported for one epoch; writes the MonoScore profile into the checkpoint."""
    report = {k: v for k, v in metrics.items() if reportable(v)}
    report["epoch"] = epoch
    report["resumed_from_epoch"] = resumed_from
    if checkpoint_dir is not None:
        profile = metrics.get("monoscore_profile") or []
        (checkpoint_dir / PROFILE_JSON).write_text(json.dumps(list(profile)))
    return report


def checkpoint_epoch(path: Path) -> int:
    """Epoch recorded in a restored checkpoint directory."""
    return int(json.loads((path / "checkpoint.json").read_text())["epoch"])


def write_status(status_dir: str | Path | None, rank: int, **fields: Any) -> None:
    """`status_dir/rank-R.json`: this worker's pid, the epoch of its last registered checkpoint
    and the epoch it resumed from (for operators and fault tests)."""
    if status_dir is None:
        return
    Path(status_dir).mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "pid": os.getpid(), **fields}
    atomic_write_bytes(Path(status_dir) / f"rank-{rank}.json", json.dumps(record).encode())


def fit_torch_workers(
    loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    *,
    workers: int,
    storage_path: str | Path,
    name: str,
    cpu_per_worker: float,
    gpu_per_worker: float,
    max_failures: int,
    callbacks: Sequence[Any],
) -> Any:
    """Run `loop(loop_config)` on `workers` Ray Train workers; returns the `ray.train.Result`.

    Checkpoints go to `storage_path/name` (keeping the last 2); a failed worker
    group restarts up to `max_failures` times from the last checkpoint. Raises
    Train's `TrainingFailedError` once the restarts are spent;
    `monoray.runs.outcome.check_outcome` turns it, or the workers'
    `Result.return_value`, into the run's outcome.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpu_per_worker}
    if gpu_per_worker > 0:
        resources["GPU"] = gpu_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpu_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


def report_to_tune(result: Any) -> None:
    """End a Tune trial that ran Train workers: their failure report (a finished result
    without objectives: FAILED once in Optuna and MLflow, not retried), else the final
    metrics with the final checkpoint (so the tracker and Pareto code see it as for
    in-process trials)."""
    from ray import tune

    if result.return_value is not None:
        tune.report(dict(result.return_value))
        return
    final = dict(result.metrics or {})
    if result.checkpoint is None:
        tune.report(final)
    else:
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(result.checkpoint.path))
