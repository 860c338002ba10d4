"""Optuna behind Ray Tune: samplers, the RDB study, and a searcher that never leaves zombies.

`OptunaSearch` tells Optuna whatever the last result held; a NaN or a missing
objective makes `tell` fail, the error is only logged, and the Optuna trial
stays RUNNING forever. `MonorayOptunaSearch` tells FAIL instead, PRUNED for a
trial MO-ASHA stopped (`monoray.sweep.moasha`; a pack member at once), records constraint values before `tell`, and tags each Optuna trial with its Ray trial
id (and each config with the Optuna trial number, which keys the MLflow run).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from monoray.runs.outcome import DIVERGED_KEY, DIVERGED_REASON_KEY, INPUT_ERROR_KEY
from monoray.runs.verbosity import optuna_level
from monoray.sweep.space import Param, SweepSpace, grid_points
from monoray.trials.packed import PACK_KEY, member_outcomes, member_reports, pack_member
from monoray.trials.verdicts import STOPPED_KEY

BASELINE_ATTR = "monoray_baseline"
RAY_TRIAL_ATTR = "ray_trial_id"
FAIL_ATTR = "fail_reason"
STOPPED_ATTR = "stopped"
"""User attrs of a PRUNED trial: where and why it stopped, and its objectives there."""
STOPPED_VALUES_ATTR = "stopped_values"
STOPPED_EPOCH_ATTR = "stopped_epoch"
TRIAL_KEY = "_optuna_trial"
"""Config key carrying the Optuna trial number into the trial and the tracker."""


def build_sampler(space: SweepSpace) -> optuna.samplers.BaseSampler:
    """Constraints reach every sampler through `Trial.set_constraint` (Optuna 5)."""
    s = space.sampler
    match s.type:
        case "tpe":
            with warnings.catch_warnings():  # `group` is "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(
                    seed=s.seed,
                    multivariate=True,
                    group=any(p.when for p in space.search),
                    n_startup_trials=s.n_startup_trials,
                )
        case "nsga2":
            return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
        case "gp":
            return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
        case "random" | "grid":
            # grid: every point is enqueued by `open_study`, so nothing is ever sampled.
            # (Optuna's GridSampler calls Study.stop(), which raises under ask/tell.)
            return optuna.samplers.RandomSampler(seed=s.seed)
    raise AssertionError(s.type)


STORAGE_SCHEMES = ("sqlite", "postgresql")
"""Optuna RDB backends monoray supports: SQLite for one machine, PostgreSQL for a cluster."""


def with_driver(url: str) -> str:
    """`postgresql://` with the driver monoray ships (psycopg2); SQLAlchemy 2.1 picks psycopg 3."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if sep and scheme == "postgresql" else url


def redact(url: str) -> str:
    """A database URL fit for messages: the password replaced by ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def storage_for(url: str) -> optuna.storages.RDBStorage:
    """Open (creating the schema if needed) an Optuna RDB storage; `InputError` if it cannot."""
    from sqlalchemy.exc import SQLAlchemyError

    from monoray.errors import InputError

    # Every study monoray opens comes through here; optuna resets its level when imported.
    optuna.logging.set_verbosity(optuna_level())
    scheme = url.partition(":")[0].partition("+")[0]
    if scheme not in STORAGE_SCHEMES:
        raise InputError(
            f"storage {redact(url)}: expected a {' or '.join(STORAGE_SCHEMES)} URL, "
            "e.g. postgresql://user@host/db"
        )
    kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        # One writer (the Tune driver), but `monoray pareto` may read concurrently.
        kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        first = str(getattr(err, "orig", None) or err).strip().splitlines()
        reason = first[0] if first else type(err).__name__
        raise InputError(f"storage {redact(url)}: cannot open it ({reason})") from None


def load_sweep_study(name: str, storage_url: str) -> optuna.Study:
    """The study of sweep `name`; `InputError` (naming what there is) when there is none."""
    from monoray.errors import InputError

    db = Path(storage_url.removeprefix("sqlite:///"))
    if storage_url.startswith("sqlite:///") and not db.exists():
        raise InputError(f"no sweeps in {db.parent} (no {db.name}); pass --root or --storage")
    storage = storage_for(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        raise InputError(
            f"no sweep named {name!r} in {redact(storage_url)} (have: {', '.join(names) or 'none'})"
        ) from None


def open_study(space: SweepSpace, name: str, storage: optuna.storages.RDBStorage) -> optuna.Study:
    """Create (or load) the sweep's study and enqueue the λ = 0 baseline first."""
    directions = ["maximize" if m == "max" else "minimize" for m in space.modes]
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions, load_if_exists=True
    )
    if list(study.directions) != [
        optuna.study.StudyDirection.MAXIMIZE
        if d == "maximize"
        else optuna.study.StudyDirection.MINIMIZE
        for d in directions
    ]:
        from monoray.errors import InputError

        raise InputError(
            f"study {name!r} in {redact(storage.url)} has other objectives; pick another --name"
        )
    if not study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(space.metric_names)
    if study.trials:
        return study
    if space.sampler.type == "grid":
        # The λ = 0 points of the grid are its baselines (no extra trial).
        for point in grid_points(space.search)[: space.budget.num_samples]:
            base = space.baseline.enabled and point.get("mono_coef") == 0
            study.enqueue_trial(point, user_attrs={BASELINE_ATTR: True} if base else {})
    elif space.baseline.enabled:
        study.enqueue_trial(dict(space.baseline.params), user_attrs={BASELINE_ATTR: True})
    return study


class DefineByRun:
    """Optuna define-by-run space: conditional parameters and the λ = 0 baseline."""

    def __init__(self, params: tuple[Param, ...]) -> None:
        self.params = params

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        baseline = bool(trial.user_attrs.get(BASELINE_ATTR))
        for p in self.params:
            if any(chosen.get(other) not in values for other, values in p.when):
                continue
            if baseline and p.name == "mono_coef":
                continue  # the baseline has no λ at all, not λ at the bottom of the range
            chosen[p.name] = _suggest(trial, p)
        return {"mono_coef": 0.0} if baseline else {}


def _suggest(trial: optuna.Trial, p: Param) -> Any:
    match p.type:
        case "categorical":
            return trial.suggest_categorical(p.name, list(p.choices))
        case "loguniform":
            return trial.suggest_float(p.name, p.low, p.high, log=True)
        case "uniform":
            return trial.suggest_float(p.name, p.low, p.high)
        case "int":
            return trial.suggest_int(p.name, int(p.low), int(p.high), step=p.step or 1, log=p.log)
    raise AssertionError(p.type)


CREATED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
"""States of a study trial that was handed out (WAITING ones are enqueued or released)."""


def n_created(study: optuna.Study) -> int:
    """How many trials of the budget the sweep has handed out so far."""
    return len(study.get_trials(deepcopy=False, states=CREATED))


class MonorayOptunaSearch(OptunaSearch):
    """`OptunaSearch` that ends every Optuna trial COMPLETE with finite values, or FAIL.

    It also ends the search: Tune runs with an unbounded `num_samples` and the study,
    not Tune's trial counter, says when the budget is handed out. Tune snapshots its
    trials and its counter in separate files, uploaded to storage by a background copy
    that can interleave two snapshots; after a driver kill the restored counter can
    run ahead of the restored trials, and a counter-bound search would never create
    the missing ones (docs/hardening.md, resume). For the same reason it limits the
    live trials itself, counted in the study: Tune's `ConcurrencyLimiter` keeps its own
    set of live trial ids, which a torn snapshot restores with trials that no longer
    exist, so the resumed search would wait for them for ever. Run it inside
    `StudyBoundSearch`, not with `TuneConfig(max_concurrent_trials=...)`.
    """

    def __init__(self, space: SweepSpace, study_name: str, storage: optuna.storages.RDBStorage):
        super().__init__(
            space=DefineByRun(space.search),
            metric=space.metric_names,
            mode=space.modes,
            sampler=build_sampler(space),
            study_name=study_name,
            storage=storage,
        )
        self._constraints = space.constraints
        self._rdb = storage
        self._budget = space.budget.num_samples
        self._pack = space.resources.pack
        self._packs: dict[str, list[optuna.Trial]] = {}
        self._max_concurrent = space.budget.max_concurrent
        self._counts: tuple[int, int] | None = None
        """(trials handed out, live Tune trials) as the study last said (`_study_counts`)."""

    def _study_counts(self) -> tuple[int, int]:
        """How many trials of the budget the study holds handed out, and how many distinct
        Tune trials its RUNNING trials belong to (a trial is RUNNING from `ask` until told;
        orphans of a killed driver are released before the fit). Only this searcher asks and
        tells, so the study is read again only after it did: Tune calls `suggest` every
        step while it may add a trial, and a study query each time cost the driver ~8 s of
        CPU in a 64-trial sweep."""
        if self._counts is None:
            created = self._ot_study.get_trials(deepcopy=False, states=CREATED)
            running = [t for t in created if t.state == TrialState.RUNNING]
            self._counts = (len(created), len({t.user_attrs.get(RAY_TRIAL_ATTR) for t in running}))
        return self._counts

    def _at_capacity(self) -> bool:
        """As many Tune trials live as allowed."""
        return 0 < self._max_concurrent <= self._study_counts()[1]

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._counts = None  # the snapshot's counts are not the study's now

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._pack > 1:
            return self._suggest_pack(trial_id)
        if self._study_counts()[0] >= self._budget:
            return Searcher.FINISHED
        if trial_id not in self._ot_trials and self._at_capacity():
            return None
        config = super().suggest(trial_id)
        self._counts = None
        if config is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return {**config, TRIAL_KEY: ot_trial.number}

    def _suggest_pack(self, trial_id: str) -> dict[str, Any] | str:
        """P Optuna trials for one Tune trial; the budget counts members, so the last is smaller."""
        if trial_id not in self._packs:
            size = min(self._pack, self._budget - self._study_counts()[0])
            if size <= 0:
                return Searcher.FINISHED
            if self._at_capacity():
                return None
            self._packs[trial_id] = [self._ot_study.ask() for _ in range(size)]
            self._counts = None
        members = []
        for ot_trial in self._packs[trial_id]:
            params = self._suggest_from_define_by_run_func(self._space, ot_trial)
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            members.append(pack_member(ot_trial.number, unflatten_dict(params)))
        return {PACK_KEY: members}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """A pack member MO-ASHA just stopped is PRUNED now, not when its pack ends: Optuna
        holds every verdict at once, for a resumed driver (`moasha.MoAshaRecorder`). The
        scheduler wrote the verdict into this result (Tune hands it the same dict first)."""
        if trial_id not in self._packs:
            return
        for number, report in member_reports(result).items():
            if report.get(STOPPED_KEY):
                (ot_trial,) = [t for t in self._packs[trial_id] if t.number == number]
                self._finish(ot_trial, report, error=False)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials:
            return
        if trial_id in self._packs:
            self._completed_trials.add(trial_id)
            outcomes = member_outcomes(result or {})
            for ot_trial in self._packs[trial_id]:
                self._finish(ot_trial, outcomes.get(ot_trial.number), error)
            return
        if trial_id not in self._ot_trials:
            return
        self._completed_trials.add(trial_id)
        self._finish(self._ot_trials[trial_id], result, error)

    def _finish(self, ot_trial: optuna.Trial, result: dict[str, Any] | None, error: bool) -> None:
        """Tell Optuna how one trial ended: COMPLETE, PRUNED or FAIL with its reason."""
        self._counts = None
        if self._stored_state(ot_trial.number).is_finished():
            # Told before the driver died, re-run by Tune from an older snapshot.
            return
        reason = failure_reason(result, self.metric, error)
        if reason is None and result is not None and result.get(STOPPED_KEY):
            self._prune(ot_trial, result)
        elif reason is None:
            assert result is not None
            for c in self._constraints:
                ot_trial.set_constraint(c.name, c.violation(float(result[c.metric])))
            self._ot_study.tell(ot_trial, [float(result[m]) for m in self.metric])
        else:
            ot_trial.set_user_attr(FAIL_ATTR, reason[:1000])
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)

    def _prune(self, ot_trial: optuna.Trial, result: dict[str, Any]) -> None:
        """Stopped by MO-ASHA: PRUNED, its objectives at the stop epoch as user attrs.

        Multi-objective trials cannot `report` intermediate values (Optuna raises), so
        the values live in user attrs; the constraints are set as for a COMPLETE trial.
        """
        for c in self._constraints:
            value = result.get(c.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                ot_trial.set_constraint(c.name, c.violation(float(value)))
        ot_trial.set_user_attr(STOPPED_ATTR, str(result[STOPPED_KEY]))
        ot_trial.set_user_attr(STOPPED_EPOCH_ATTR, int(result.get("epoch", 0)))
        ot_trial.set_user_attr(STOPPED_VALUES_ATTR, [float(result[m]) for m in self.metric])
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)

    def _stored_state(self, number: int) -> TrialState:
        storage = self._rdb
        study_id = storage.get_study_id_from_name(self._ot_study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        return storage.get_trial(trial_id).state


class StudyBoundSearch(SearchGenerator):
    """Tune's `SearchGenerator` around `MonorayOptunaSearch`: finished when the searcher
    says so in this session.

    Tune restores the generator's `finished` flag and trial counter from a snapshot file
    written apart from the trial list; after a driver kill they can describe trials the
    restored list lacks (the search "finished" with a trial of the budget missing), so a
    restored generator asks the searcher again, which answers from the study.
    """

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._finished = False


def failure_reason(result: dict[str, Any] | None, metrics: list[str], error: bool) -> str | None:
    """Why a finished trial cannot be told COMPLETE, or None if it can."""
    if error:
        return "trial raised an error (see the MLflow run / Ray logs)"
    if not result:
        return "trial reported nothing"
    if result.get(DIVERGED_KEY):
        return str(result.get(DIVERGED_REASON_KEY) or "training diverged (non-finite loss)")
    if result.get(INPUT_ERROR_KEY):
        return f"bad input: {result[INPUT_ERROR_KEY]}"
    for m in metrics:
        value = result.get(m)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"objective {m} is {value!r}"
    return None


def verdicts(study_name: str, storage_url: str) -> dict[int, dict[str, Any]]:
    """Optuna trial number -> user attrs of every PRUNED trial of the study (MO-ASHA's stops)."""
    study = optuna.load_study(study_name=study_name, storage=storage_for(storage_url))
    return {
        t.number: t.user_attrs
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if STOPPED_EPOCH_ATTR in t.user_attrs
    }


def release_orphans(
    study: optuna.Study, storage: optuna.storages.RDBStorage, known: set[str]
) -> int:
    """Put RUNNING trials that Tune does not know back to WAITING (after a driver kill).

    The driver can die after Optuna handed out a trial but before Tune saved it.
    Optuna's `ask` reuses WAITING trials with their parameters, so the resumed
    sweep runs them instead of creating extra trials: the study still ends with
    exactly `num_samples` trials.
    """
    released = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(RAY_TRIAL_ATTR) not in known:
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), t.number
            )
            storage.set_trial_state_values(trial_id, TrialState.WAITING)
            released += 1
    return released


def fail_leftovers(study: optuna.Study, storage: optuna.storages.RDBStorage, reason: str) -> int:
    """Mark trials still RUNNING after a finished sweep as FAIL (never leave zombies)."""
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), t.number
        )
        storage.set_trial_user_attr(trial_id, FAIL_ATTR, reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        count += 1
    return count
