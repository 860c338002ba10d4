"""Live progress of a sweep in the driver (a Tune callback), on stderr.

Trials done / running / failed / pruned, elapsed time, an ETA at this session's rate so
far, and the current Pareto front (its size and the best value of each objective). On a
terminal it is one rich display updated in place; elsewhere (logs, `ray job logs`) a
plain status line when a trial finishes, at most every `PLAIN_EVERY_S`, and at the end.
A failed trial always gets one line with its reason. Counts come from Tune's trial list,
so a resumed sweep shows the trials finished before the interruption too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from monoray.sweep.search import failure_reason
from monoray.sweep.space import Constraint
from monoray.sweep.tracking import error_line, member_results, trial_members
from monoray.trials.verdicts import STOPPED_KEY

PLAIN_EVERY_S = 30.0
"""Least time between two plain status lines (not on a terminal)."""


@dataclass(frozen=True, slots=True)
class Counts:
    """Where the sweep's trials are (Tune's view; `done` means COMPLETE in the study)."""

    total: int
    done: int = 0
    failed: int = 0
    pruned: int = 0
    running: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.pruned


def nondominated(points: dict[int, Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Keys of the points no other point dominates (`modes`: "max" / "min" per objective).

    Equal points do not dominate each other, so all copies of a front point are on the
    front, as in Optuna's `Study.best_trials`.
    """
    signed = {
        k: [v if m == "max" else -v for v, m in zip(p, modes, strict=True)]
        for k, p in points.items()
    }

    def dominates(a: list[float], b: list[float]) -> bool:
        pairs = list(zip(a, b, strict=True))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return sorted(k for k, a in signed.items() if not any(dominates(b, a) for b in signed.values()))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class SweepProgress(Callback):
    """The sweep's live status (on a terminal) or occasional status lines, plus failures."""

    def __init__(
        self,
        total: int,
        metrics: list[str],
        modes: list[str],
        constraints: Sequence[Constraint] = (),
        *,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.metrics = metrics
        self.modes = modes
        self.constraints = tuple(constraints)
        self.enabled = enabled
        self._reset()

    def _reset(self) -> None:
        self._console: Console | None = None
        self._live: Live | None = None
        self._start = time.monotonic()
        self._finished_at_start: int | None = None
        self._last_plain = float("-inf")
        self._counts = Counts(self.total)
        self._front: dict[int, list[float]] = {}

    # Tune pickles callbacks with the experiment (and runs the unpickled copy on --resume).
    def __getstate__(self) -> dict[str, Any]:
        keep = ("total", "metrics", "modes", "constraints", "enabled")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info: Any) -> None:
        if not self.enabled:
            return
        self._start = time.monotonic()
        self._console = Console(file=sys.stderr)
        if self._console.is_terminal:
            self._live = Live(
                get_renderable=self._renderable,
                console=self._console,
                refresh_per_second=2,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    # -- what the display shows ------------------------------------------------------

    def _classify(self, status: str, result: dict[str, Any]) -> str:
        if status == "ERROR":
            return "failed"
        if status == "RUNNING":
            return "running"
        if status != "TERMINATED":
            return "waiting"
        if failure_reason(result, self.metrics, error=False) is not None:
            return "failed"
        return "pruned" if result.get(STOPPED_KEY) else "done"

    def _feasible(self, result: dict[str, Any]) -> bool:
        values = [result.get(c.metric) for c in self.constraints]
        return all(
            isinstance(v, (int, float)) and c.violation(float(v)) <= 0
            for c, v in zip(self.constraints, values, strict=True)
        )

    def _update(self, trials: list, ended: Any = None) -> None:
        kinds: dict[str, int] = {"done": 0, "failed": 0, "pruned": 0, "running": 0, "waiting": 0}
        points: dict[int, list[float]] = {}
        for trial in trials:
            # Tune calls on_trial_complete before it moves the trial from RUNNING to TERMINATED.
            status = "TERMINATED" if trial is ended and trial.status == "RUNNING" else trial.status
            for number, result in member_results(trial):
                kind = self._classify(status, result)
                kinds[kind] += 1
                if kind == "done" and self._feasible(result):
                    points[number] = [float(result[m]) for m in self.metrics]
        del kinds["waiting"]
        self._counts = Counts(self.total, **kinds)
        if self._finished_at_start is None:
            self._finished_at_start = self._counts.finished
        self._front = {n: points[n] for n in nondominated(points, self.modes)}

    def counts_status(self) -> str:
        c = self._counts
        pruned = f", {c.pruned} pruned" if c.pruned else ""  # only MO-ASHA stops trials
        return f"{c.done} done, {c.failed} failed{pruned}, {c.running} running"

    def time_status(self) -> tuple[str, str]:
        """(elapsed, ETA at this session's rate so far)."""
        c = self._counts
        elapsed = time.monotonic() - self._start
        finished_here = c.finished - (self._finished_at_start or 0)
        eta = "--"
        if c.finished >= c.total:
            eta = "0:00"
        elif finished_here > 0:
            eta = _clock(elapsed / finished_here * (c.total - c.finished))
        return _clock(elapsed), eta

    def front_status(self) -> str:
        if not self._front:
            return "front: no completed trial yet"
        best = []
        for i, (m, mode) in enumerate(zip(self.metrics, self.modes, strict=True)):
            pick = max if mode == "max" else min
            number = pick(self._front, key=lambda n, i=i: self._front[n][i])
            best.append(f"{m} {self._front[number][i]:.4f} (#{number})")
        return f"front {len(self._front)}: best " + ", ".join(best)

    def _renderable(self) -> Group:
        c = self._counts
        row = Table.grid(padding=(0, 1))
        row.add_row(
            Text("sweep", style="bold"),
            ProgressBar(total=max(c.total, 1), completed=c.finished, width=30),
            Text(f"{c.finished}/{c.total}"),
            Text("{} elapsed, ETA {}".format(*self.time_status())),
        )
        return Group(row, Text(self.counts_status()), Text(self.front_status()))

    def _say(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def _plain(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is None and (force or now - self._last_plain >= PLAIN_EVERY_S):
            c = self._counts
            parts = [self.counts_status(), "{}, ETA {}".format(*self.time_status())]
            parts.append(self.front_status())
            self._say(f"sweep {c.finished}/{c.total}: " + " | ".join(parts))
            self._last_plain = now

    # -- Tune callback hooks -----------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.enabled:
            self._update(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self.enabled:
            return
        self._update(trials, ended=trial)
        for number, result in member_results(trial):
            reason = failure_reason(result, self.metrics, error=False)
            if reason is not None:
                self._say(f"trial {number} FAILED: {_one_line(reason)}")
        self._plain()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self.enabled:
            return
        self._update(trials)
        message = _one_line(error_line(trial))
        for number, _ in trial_members(trial):
            self._say(f"trial {number} ERROR: {message}")
        self._plain()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not self.enabled:
            return
        self._update(trials)
        if self._live is not None:
            self._live.stop()  # the last rendering stays on the terminal
            self._live = None
        else:
            self._plain(force=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
