"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

Rungs sit at epochs `grace · η^i` below the trial's last epoch (a rung at the last
epoch would save nothing). When a trial reports a rung epoch it is recorded in
that rung's table and judged at once against everything recorded there so far
(asynchronous: nobody waits for a rung to fill, earlier verdicts stand). It
continues iff its position in the rung's ranking is below `ceil(n / η)`, `n`
the number of trials recorded at the rung, itself included: the first trial at
a rung always continues.

Ranking (`rank`), best first:
1. feasible trials with finite objectives, by non-dominated sorting on the
   objectives (their max/min directions); within a front by crowding distance
   (largest first, the front's extremes infinite), then by arrival at the rung;
2. infeasible trials (a constraint violated, or its metric missing/NaN), by
   total violation, then arrival;
3. trials with a NaN (or missing) objective, by arrival.

Only the arriving trial is judged, so a trial can be judged by a table that
later fills with better ones; that is what makes successive halving asynchronous.
A verdict is final: a stopped trial that Tune runs again (a retry, or a resume
from a snapshot older than the stop) is stopped again at the same epoch.

A stop reaches the rest of monoray through the trial's result: `MoAshaRecorder`,
the scheduler's companion Tune callback, writes the verdict under `STOPPED_KEY`
into the stopped result before the tracker sees it, so the searcher tells Optuna
PRUNED and the tracker tags the MLflow run. The recorder also carries the rung
tables in Tune's callback state, which Tune snapshots with the experiment and
restores on `Tuner.restore` (Tune keeps no scheduler state of its own). Each
trial is judged on its own result, so a member of a packed trial can be stopped
alone once packs report per-member results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from monoray.configs import field_defaults
from monoray.sweep.search import STOPPED_ATTR, STOPPED_EPOCH_ATTR, STOPPED_KEY, verdicts
from monoray.sweep.space import Constraint, Objective, SweepSpace


@dataclass(frozen=True, slots=True)
class RungEntry:
    """One trial's record at one rung."""

    trial_id: str
    order: int
    """Arrival at the rung (ties go to the earlier trial)."""
    values: tuple[float, ...]
    """The objectives, in the space's order; NaN where missing."""
    violation: float = 0.0
    """Total constraint violation (0: feasible; inf: a constraint metric is missing)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    keep: bool
    position: int
    """0-based place in the rung's ranking."""
    n: int
    kept: int
    """How many of the `n` trials at the rung continue (`ceil(n / η)`)."""
    why: str


def rung_epochs(grace: int, eta: int, epochs: int) -> tuple[int, ...]:
    """The rung epochs of a trial of `epochs` epochs: grace · η^i < epochs."""
    out, rung = [], grace
    while rung < epochs:
        out.append(rung)
        rung *= eta
    return tuple(out)


def _minimised(values: tuple[float, ...], modes: Sequence[str]) -> tuple[float, ...]:
    return tuple(-v if m == "max" else v for v, m in zip(values, modes, strict=True))


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def fronts(points: Sequence[tuple[float, ...]]) -> list[list[int]]:
    """Non-dominated sorting of minimised points: lists of indices, first front first."""
    left = list(range(len(points)))
    out = []
    while left:
        front = [i for i in left if not any(_dominates(points[j], points[i]) for j in left)]
        out.append(front)
        left = [i for i in left if i not in front]
    return out


def crowding(points: Sequence[tuple[float, ...]], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each index of one front (extremes: inf; equal points: 0)."""
    dist = dict.fromkeys(front, 0.0)
    for k in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: points[i][k])
        span = points[ordered[-1]][k] - points[ordered[0]][k]
        if span == 0:  # no extremes on an objective where the whole front is equal
            continue
        dist[ordered[0]] = dist[ordered[-1]] = math.inf
        for prev, mid, nxt in zip(ordered, ordered[1:], ordered[2:], strict=False):
            dist[mid] += (points[nxt][k] - points[prev][k]) / span
    return dist


def rank(entries: Sequence[RungEntry], modes: Sequence[str]) -> list[tuple[RungEntry, str]]:
    """The rung's entries best first, each with the reason it sits where it does."""
    nan = [e for e in entries if any(math.isnan(v) for v in e.values)]
    infeasible = [e for e in entries if e not in nan and e.violation > 0]
    feasible = [e for e in entries if e not in nan and e.violation <= 0]
    points = [_minimised(e.values, modes) for e in feasible]
    out: list[tuple[RungEntry, str]] = []
    for depth, front in enumerate(fronts(points), start=1):
        dist = crowding(points, front)
        front.sort(key=lambda i: (-dist[i], feasible[i].order))
        why = "crowded out of the first front" if depth == 1 else f"dominated (front {depth})"
        out += [(feasible[i], why) for i in front]
    out += [(e, "infeasible") for e in sorted(infeasible, key=lambda e: (e.violation, e.order))]
    out += [(e, "objective is NaN") for e in sorted(nan, key=lambda e: e.order)]
    return out


def judge(entries: Sequence[RungEntry], trial_id: str, modes: Sequence[str], eta: int) -> Verdict:
    """Does `trial_id` (recorded in `entries`) continue past this rung?"""
    ranked = rank(entries, modes)
    position = next(i for i, (e, _) in enumerate(ranked) if e.trial_id == trial_id)
    kept = math.ceil(len(ranked) / eta)
    return Verdict(position < kept, position, len(ranked), kept, ranked[position][1])


class MoAshaScheduler(FIFOScheduler):
    """Stops a trial at a rung unless it ranks in the best `ceil(n / η)` there."""

    def __init__(
        self,
        objectives: Sequence[Objective],
        constraints: Sequence[Constraint],
        *,
        grace_epochs: int,
        reduction_factor: int,
        default_epochs: int,
    ) -> None:
        super().__init__()
        self.objectives = tuple(objectives)
        self.constraints = tuple(constraints)
        self.grace = grace_epochs
        self.eta = reduction_factor
        self.default_epochs = default_epochs
        self.rungs: dict[int, dict[str, RungEntry]] = {}
        self.stopped: dict[str, tuple[int, str]] = {}
        """Final verdicts: trial id -> (stop epoch, where and why)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        epoch = int(result.get("epoch", 0))
        rungs = rung_epochs(
            self.grace, self.eta, int(trial.config.get("epochs", self.default_epochs))
        )
        if epoch in rungs:
            table = self.rungs.setdefault(epoch, {})
            previous = table.get(trial.trial_id)  # a retry or a resumed sweep reports it again
            table[trial.trial_id] = self.entry(
                trial.trial_id, len(table) if previous is None else previous.order, result
            )
        stop = self.stopped.get(trial.trial_id)
        if stop is not None and epoch >= stop[0]:
            # Re-run after a verdict (a resume from a snapshot older than the stop, or a
            # retry): the verdict stands, the records already say it.
            return TrialScheduler.STOP
        if epoch not in rungs:
            return TrialScheduler.CONTINUE
        verdict = judge(
            list(table.values()), trial.trial_id, [o.mode for o in self.objectives], self.eta
        )
        if verdict.keep:
            return TrialScheduler.CONTINUE
        self.stopped[trial.trial_id] = (
            epoch,
            f"rung {rungs.index(epoch) + 1} (epoch {epoch}): {verdict.why}, "
            f"rank {verdict.position + 1} of {verdict.n}, kept {verdict.kept}",
        )
        return TrialScheduler.STOP

    def entry(self, trial_id: str, order: int, result: dict) -> RungEntry:
        values = tuple(_number(result.get(o.metric)) for o in self.objectives)
        violation = 0.0
        for c in self.constraints:
            value = _number(result.get(c.metric))
            violation += math.inf if math.isnan(value) else max(0.0, c.violation(value))
        return RungEntry(trial_id, order, values, violation)

    def get_state(self) -> dict[str, Any]:
        rungs = {
            str(epoch): [[e.trial_id, e.order, list(e.values), e.violation] for e in t.values()]
            for epoch, t in self.rungs.items()
        }
        return {"rungs": rungs, "stopped": {k: list(v) for k, v in self.stopped.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self.rungs = {
            int(epoch): {row[0]: RungEntry(row[0], row[1], tuple(row[2]), row[3]) for row in rows}
            for epoch, rows in state["rungs"].items()
        }
        self.stopped = {k: (int(v[0]), str(v[1])) for k, v in state["stopped"].items()}

    def debug_string(self) -> str:
        return f"MO-ASHA: {len(self.stopped)} stopped, rungs {sorted(self.rungs)}"


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


class MoAshaRecorder(Callback):
    """The scheduler's companion: marks stopped results and snapshots the rung tables.

    It must come before the tracker in `RunConfig(callbacks=...)`: callbacks see the
    result in list order, and Tune stores the result (flag included) as the trial's
    last result, which the searcher and the tracker read when the trial completes.
    The scheduler and this callback are pickled together in `tuner.pkl`, so after
    `Tuner.restore` they are still one object pair and `set_state` reaches the
    scheduler Tune actually runs.
    """

    def __init__(
        self, scheduler: MoAshaScheduler, table_path: Path, study_name: str, storage_url: str
    ) -> None:
        self.scheduler = scheduler
        self.table_path = table_path
        """Where the rung tables are written (JSON) when `Tuner.fit` ends."""
        self.study_name = study_name
        self.storage_url = storage_url

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        stop = self.scheduler.stopped.get(trial.trial_id)
        if stop is not None and result.get("done"):
            result[STOPPED_KEY] = stop[1]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        rungs = {
            str(epoch): [
                {
                    "trial_id": e.trial_id,
                    "values": [None if math.isnan(v) else v for v in e.values],
                    "violation": None if math.isinf(e.violation) else e.violation,
                }
                for e in sorted(table.values(), key=lambda e: e.order)
            ]
            for epoch, table in sorted(self.scheduler.rungs.items())
        }
        doc = {"rungs": rungs, "stopped": {k: v[1] for k, v in self.scheduler.stopped.items()}}
        self.table_path.write_text(json.dumps(doc, indent=1, allow_nan=False))

    def get_state(self) -> dict[str, Any]:
        return self.scheduler.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the rung tables, then every verdict the study holds: Optuna heard of
        a stop at once, Tune's snapshot (and this state with it) may be older."""
        self.scheduler.set_state(state)
        for trial_id, attrs in verdicts(self.study_name, self.storage_url).items():
            stop = (int(attrs[STOPPED_EPOCH_ATTR]), str(attrs[STOPPED_ATTR]))
            self.scheduler.stopped.setdefault(trial_id, stop)


RUNGS_FILE = "mo_asha_rungs.json"
"""Written into the Tune experiment directory: every rung's table, in arrival order."""


def build_scheduler(
    space: SweepSpace, exp_dir: Path, study_name: str, storage_url: str
) -> tuple[TrialScheduler | None, list[Callback]]:
    """The space's scheduler and the callbacks that must precede the tracker (none: FIFO)."""
    s = space.scheduler
    if s.type == "fifo":
        return None, []
    scheduler = MoAshaScheduler(
        space.objectives,
        space.constraints,
        grace_epochs=s.grace_epochs,
        reduction_factor=s.reduction_factor,
        default_epochs=field_defaults(space.trial_kind.config)["epochs"],
    )
    recorder = MoAshaRecorder(scheduler, exp_dir / RUNGS_FILE, study_name, storage_url)
    return scheduler, [recorder]
