"""Live progress of a sweep in the driver (a Tune callback).

On a terminal: a rich bar of finished trials with the running trial's latest
epoch. Always: one plain line per finished trial on stderr, flushed, so logs
and `ray job logs` show progress too.
"""

from __future__ import annotations

import sys
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from monoray.sweep.search import STOPPED_KEY, TRIAL_KEY, failure_reason


class SweepProgress(Callback):
    """A bar of finished trials (on a terminal) plus one line per finished trial."""

    def __init__(self, total: int, metrics: list[str], *, enabled: bool = True) -> None:
        self.total = total
        self.metrics = metrics
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: Any = None
        self._done = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None, "_task": None}

    def setup(self, **info: Any) -> None:
        if not self.enabled:
            return
        console = Console(file=sys.stderr)
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]sweep"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total)

    def _shown(self, result: dict[str, Any]) -> str:
        return " ".join(f"{m}={result[m]:.4f}" for m in self.metrics if m in result)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any):
        if self._bar is not None and "epoch" in result:
            number = trial.config.get(TRIAL_KEY, "?")
            text = f"trial {number} epoch {result['epoch']} {self._shown(result)}"
            self._bar.update(self._task, description=text)

    def _finish(self, trial: Any, status: str) -> None:
        if not self.enabled:
            return
        self._done += 1
        line = f"trial {trial.config.get(TRIAL_KEY, '?'):>3} {status:<6} {self._shown(trial.last_result or {})}"
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done)
            self._bar.console.print(line)
        else:
            print(f"[{self._done}/{self.total}] {line}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        reason = failure_reason(result, self.metrics, error=False)
        stopped = reason is None and result.get(STOPPED_KEY)
        self._finish(trial, "FAILED" if reason else "stop" if stopped else "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
