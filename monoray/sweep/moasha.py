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

The contestants are Optuna trials, keyed by their trial number: a Tune trial's
own, or each member of a packed Tune trial (`resources.pack`), judged on its own
epoch results (in the pack's epoch results, `member_reports`) with its own epochs.

Only the arriving trial is judged, so a trial can be judged by a table that
later fills with better ones; that is what makes successive halving asynchronous.
A verdict is final: a stopped trial that Tune runs again (a retry, or a resume
from a snapshot older than the stop) is stopped again at the same epoch, and a
trial kept at a rung and reported there again (a restored trial first re-reports
its checkpoint's epoch) is kept, not judged again by a fuller table.

A stop reaches the rest of monoray through the trial's result: `MoAshaRecorder`,
the scheduler's companion Tune callback, writes the verdict under `STOPPED_KEY`
into the stopped result before the tracker sees it, so the searcher tells Optuna
PRUNED and the tracker tags the MLflow run. The recorder also carries the rung
tables in Tune's callback state, which Tune snapshots with the experiment and
restores on `Tuner.restore` (Tune keeps no scheduler state of its own).

A pack member is stopped alone, its pack goes on (the scheduler never stops a
pack): the scheduler publishes each member verdict to the sweep's `VerdictBoard`
(`monoray.trials.verdicts`), which the pack waits on at the member's rungs, and
writes a stop into the member's result in the pack's epoch result, which Tune
hands to the searcher next: the member is PRUNED in Optuna at once. Its MLflow
run ends when the pack does, from the pack's outcomes, which carry the verdict.
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
from monoray.sweep.search import STOPPED_ATTR, STOPPED_EPOCH_ATTR, TRIAL_KEY, verdicts
from monoray.sweep.space import Constraint, Objective, SweepSpace
from monoray.trials.packed import PACK_KEY, bundle, member_reports, pack_members
from monoray.trials.verdicts import KEEP, STOPPED_KEY, open_board, rung_epochs


@dataclass(frozen=True, slots=True)
class RungEntry:
    """One trial's record at one rung."""

    key: str
    """The contestant: its Optuna trial number (a pack member's own)."""
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


def judge(entries: Sequence[RungEntry], key: str, modes: Sequence[str], eta: int) -> Verdict:
    """Does contestant `key` (recorded in `entries`) continue past this rung?"""
    ranked = rank(entries, modes)
    position = next(i for i, (e, _) in enumerate(ranked) if e.key == key)
    kept = math.ceil(len(ranked) / eta)
    return Verdict(position < kept, position, len(ranked), kept, ranked[position][1])


class MoAshaScheduler(FIFOScheduler):
    """Stops a trial (or a pack member) at a rung unless it ranks in the best `ceil(n / η)`."""

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
        """Final verdicts: contestant -> (stop epoch, where and why)."""
        self.board: Any = None
        """The sweep's `VerdictBoard` (packed sweeps; set by `MoAshaRecorder.setup`)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if PACK_KEY not in trial.config:
            epochs = int(trial.config.get("epochs", self.default_epochs))
            stop = self.verdict(str(trial.config[TRIAL_KEY]), epochs, result)
            return TrialScheduler.CONTINUE if stop is None else TrialScheduler.STOP
        reports = member_reports(result)
        if not reports:
            return TrialScheduler.CONTINUE  # the pack's last result: its members' outcomes
        members = dict(pack_members(trial.config))
        for number, report in reports.items():
            epochs = int(members[number].get("epochs", self.default_epochs))
            stop = self.verdict(str(number), epochs, report)
            epoch = int(report.get("epoch", 0))
            if stop is not None:
                report[STOPPED_KEY] = stop
            if stop is not None or epoch in rung_epochs(self.grace, self.eta, epochs):
                self.board.publish.remote(number, epoch, KEEP if stop is None else stop)
        result.update(bundle(reports))  # the searcher reads the stops next (module doc)
        return TrialScheduler.CONTINUE  # a pack goes on; its stopped members end alone

    def verdict(self, key: str, epochs: int, result: dict) -> str | None:
        """Record contestant `key`'s result at a rung; why it stops there (or stood stopped
        before), None if it goes on."""
        epoch = int(result.get("epoch", 0))
        rungs = rung_epochs(self.grace, self.eta, epochs)
        previous = None
        if epoch in rungs:
            table = self.rungs.setdefault(epoch, {})
            previous = table.get(key)  # a retry or a resumed sweep reports it again
            table[key] = self.entry(key, len(table) if previous is None else previous.order, result)
        stop = self.stopped.get(key)
        if stop is not None and epoch >= stop[0]:
            # Re-run after a verdict (a resume from a snapshot older than the stop, or a
            # retry): the verdict stands, the records already say it.
            return stop[1]
        if epoch not in rungs or previous is not None:
            return None  # no rung, or kept here before: that verdict stands
        verdict = judge(list(table.values()), key, [o.mode for o in self.objectives], self.eta)
        if verdict.keep:
            return None
        why = (
            f"rung {rungs.index(epoch) + 1} (epoch {epoch}): {verdict.why}, "
            f"rank {verdict.position + 1} of {verdict.n}, kept {verdict.kept}"
        )
        self.stopped[key] = (epoch, why)
        return why

    def entry(self, key: str, order: int, result: dict) -> RungEntry:
        values = tuple(_number(result.get(o.metric)) for o in self.objectives)
        violation = 0.0
        for c in self.constraints:
            value = _number(result.get(c.metric))
            violation += math.inf if math.isnan(value) else max(0.0, c.violation(value))
        return RungEntry(key, order, values, violation)

    def get_state(self) -> dict[str, Any]:
        rungs = {
            str(epoch): [[e.key, e.order, list(e.values), e.violation] for e in t.values()]
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
        self,
        scheduler: MoAshaScheduler,
        table_path: Path,
        study_name: str,
        storage_url: str,
        *,
        packed: bool,
    ) -> None:
        self.scheduler = scheduler
        self.table_path = table_path
        """Where the rung tables are written (JSON) when `Tuner.fit` ends."""
        self.study_name = study_name
        """The sweep's study, and its Tune experiment (whose name the packs look the board up by)."""
        self.storage_url = storage_url
        self.packed = packed
        """Packed trials: the scheduler publishes member verdicts to a `VerdictBoard`."""

    def setup(self, **info: Any) -> None:
        """Packed: open the sweep's board with every verdict so far (restored ones on a resume:
        Tune restores callback state before it sets callbacks up), before any pack starts."""
        if not self.packed:
            return
        import ray

        board = open_board(self.study_name)
        self.scheduler.board = board
        stops = self.scheduler.stopped.items()
        ray.get([board.publish.remote(int(k), epoch, why) for k, (epoch, why) in stops])

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if PACK_KEY in trial.config:
            return  # members' verdicts travel in the pack's outcomes
        stop = self.scheduler.stopped.get(str(trial.config[TRIAL_KEY]))
        if stop is not None and result.get("done"):
            result[STOPPED_KEY] = stop[1]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        rungs = {
            str(epoch): [
                {
                    "trial": e.key,
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
        for number, attrs in verdicts(self.study_name, self.storage_url).items():
            stop = (int(attrs[STOPPED_EPOCH_ATTR]), str(attrs[STOPPED_ATTR]))
            self.scheduler.stopped.setdefault(str(number), stop)


RUNGS_FILE = "mo_asha_rungs.json"
"""Written into the Tune experiment directory: every rung's table (contestants by Optuna
trial number), in arrival order."""


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
    recorder = MoAshaRecorder(
        scheduler, exp_dir / RUNGS_FILE, study_name, storage_url, packed=space.resources.pack > 1
    )
    return scheduler, [recorder]
