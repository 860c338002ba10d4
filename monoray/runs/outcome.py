"""The run contract: how a run ends, the same for every executor.

A run (`monoray train`, `monoray finetune`, in one process, on W Ray Train
workers or inside a Tune trial) ends in exactly one of:

- success: `out/metrics.json` holds the final epoch's metrics (`write_metrics`,
  the same keys whatever ran it), checkpoints under `out/checkpoints/`; exit 0;
- divergence (`DivergedError`: a non-finite loss or parameter): one line
  `monoray <cmd>: diverged: <reason> (hint)`, exit `DIVERGED_EXIT`; the
  checkpoints of the finished epochs stay; in a sweep one FAILED trial, not retried;
- bad input (`monoray.errors.InputError`): one line, exit 2;
- anything else a worker raised (`RunFailedError`): one line naming the rank, exit 1.

Multi-worker runs follow it in two halves. A worker catches its expected
failure and returns `failure_report(err, rank)` from the train function instead
of raising (Ray Train restarts the worker group on any raised error, and a
divergence or a bad input would only happen again; Train hands rank 0's return
value back as `Result.return_value`, while `Result.metrics` stays those of the
last checkpoint). The driver then calls `check_outcome(return_value, error)`,
which re-raises the failing rank's failure as one of the types above, and on
success writes `metrics.json` from the final checkpoint's history.
A new multi-worker executor (e.g. `monoray train --workers W`) wires in as
`monoray finetune --workers` does (`monoray/finetune/cli.py::_distributed`,
`monoray/finetune/trial.py`):

    # train function, on every rank
    try:
        train_sae(...)
    except (DivergedError, InputError) as err:
        return failure_report(err, rank)   # all ranks see it together
    # driver
    try:
        result = trainer.fit()
        report, error = result.return_value, result.error
    except ray.train.TrainingFailedError as err:
        report, error = None, err
    check_outcome(report, error)           # raises -> `monoray.cli.main`: one line, exit 3/2/1
    write_metrics(out, load_checkpoint(out / "checkpoints").history[-1])
    # Tune trial: tune.report(dict(result.return_value)) when it is not None
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monoray.errors import InputError
from monoray.runs.files import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np

DIVERGED_EXIT = 3
"""Exit code of a run that diverged (bad input is 2, an interrupt 130)."""
FAILED_EXIT = 1
"""Exit code of a run whose worker failed for another reason (`RunFailedError`)."""
METRICS_FILE = "metrics.json"
"""The final metrics of a run, in its out dir."""
PROFILE_FILE = "monoscore_profile.png"
"""The MonoScore profile plot of an SAE run, in its out dir."""
DIVERGED_HINT = "lower --lr"
"""What the one-line divergence message suggests."""

DIVERGED_KEY = "diverged"
DIVERGED_REASON_KEY = "diverged_reason"
"""Keys of a worker's divergence report (the sweep's `failure_reason` reads them too)."""
INPUT_ERROR_KEY = "input_error"
"""Key of a worker's bad-input report: the one-line message."""


class DivergedError(RuntimeError):
    """The training loss (or a parameter) became NaN or inf; the message names where."""


class RunFailedError(RuntimeError):
    """A worker of a run failed for a reason that is neither divergence nor bad input."""


def diverged_line(command: str, err: DivergedError) -> str:
    """The one stderr line of a diverged run."""
    return f"monoray {command}: diverged: {err} ({DIVERGED_HINT})"


def json_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON values; a metric without meaning on this data (NaN/inf, e.g. the
    purity of an unlabelled split) is left out rather than written as null."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write `out_dir/metrics.json` atomically (sorted keys, non-finite metrics left out); returns its path.

    Every executor writes the final metrics of a run through this, with the
    same dict: the last entry of the checkpoint history (`train_sae` /
    `train_finetune` return it, a multi-worker driver reads it from the final
    checkpoint), so the file has the same keys in process and on W workers.
    """
    path = Path(out_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(json_metrics(metrics), indent=1, sort_keys=True).encode())
    return path


def failure_report(err: BaseException, rank: int) -> dict[str, Any] | None:
    """What a worker returns (or a Tune trial reports) instead of raising an expected failure.

    None for any other error (let it raise). Return it only for failures all
    ranks see together (the divergence checks are all-reduced, and input
    checks either read the same data or agree over the group, as
    `mono_loss_global` does), or the other ranks wait in a collective.
    """
    if isinstance(err, DivergedError):
        return {DIVERGED_KEY: 1, DIVERGED_REASON_KEY: f"diverged: {err}", "rank": rank}
    if isinstance(err, InputError):
        return {INPUT_ERROR_KEY: str(err), "rank": rank}
    return None


def check_outcome(report: Mapping[str, Any] | None, error: BaseException | None) -> None:
    """Raise the failure of a finished multi-worker run as one line; return if it succeeded.

    `report`: rank 0's `failure_report` (the train function's return value,
    None on success); `error`: what the executor raised (a Ray Train
    `WorkerGroupError` carries `worker_failures`, rank -> exception; the
    lowest failing rank is named). Raises `DivergedError`, `InputError` or
    `RunFailedError`.
    """
    if error is not None:
        failures = getattr(error, "worker_failures", None) or {}
        if not failures:
            raise RunFailedError(_first_line(error)) from None
        rank = min(failures)
        cause = failures[rank]
        if isinstance(cause, DivergedError):
            raise DivergedError(f"{cause} (rank {rank})") from None
        if isinstance(cause, InputError):
            raise InputError(f"{cause} (rank {rank})") from None
        raise RunFailedError(f"rank {rank}: {_first_line(cause)}") from None
    report = report or {}
    if report.get(DIVERGED_KEY):
        reason = str(report.get(DIVERGED_REASON_KEY, "non-finite loss"))
        raise DivergedError(reason.removeprefix("diverged: "))
    if INPUT_ERROR_KEY in report:
        raise InputError(str(report[INPUT_ERROR_KEY]))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def write_outputs(out_dir: Path, metrics: dict[str, float], monoscore: np.ndarray | None) -> None:
    """Write `metrics.json` (finite metrics only) and, given per-latent MonoScores, their profile PNG."""
    write_metrics(out_dir, metrics)
    if monoscore is not None:
        from monoray.plots import (
            plot_monoscore_profile,  # matplotlib: only runs that plot pay for it
        )

        plot_monoscore_profile(monoscore, out_dir / PROFILE_FILE)
