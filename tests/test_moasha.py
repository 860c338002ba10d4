"""MO-ASHA's decisions on hand-made rung tables (no Ray), and its `scheduler:` key."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from monoray.errors import InputError
from monoray.sweep.moasha import (
    MoAshaScheduler,
    RungEntry,
    crowding,
    fronts,
    judge,
    rank,
)
from monoray.sweep.search import TRIAL_KEY
from monoray.sweep.space import Constraint, Objective, load_space
from monoray.trials.verdicts import rung_epochs

MAXMAX = ("max", "max")
NAN = math.nan


def table(*rows: tuple[float, ...], violation: dict[int, float] | None = None) -> list[RungEntry]:
    violation = violation or {}
    return [RungEntry(f"t{i}", i, row, violation.get(i, 0.0)) for i, row in enumerate(rows)]


def order(entries: list[RungEntry], modes=MAXMAX) -> list[str]:
    return [e.key for e, _ in rank(entries, modes)]


def test_rungs_below_the_last_epoch() -> None:
    assert rung_epochs(2, 3, 20) == (2, 6, 18)
    assert rung_epochs(2, 3, 18) == (2, 6)  # a rung at the last epoch would save nothing
    assert rung_epochs(1, 2, 16) == (1, 2, 4, 8)
    assert rung_epochs(5, 2, 5) == ()


def test_dominated_trial_ranks_after_the_front() -> None:
    # t1 dominates t0; t2 trades off with t1 (same front); t0 is front 2.
    entries = table((0.5, 0.5), (0.9, 0.9), (0.95, 0.1))
    ranked = rank(entries, MAXMAX)
    assert [e.key for e, _ in ranked] == ["t1", "t2", "t0"]
    assert ranked[2][1] == "dominated (front 2)"


def test_minimise_maximise_mix() -> None:
    # Objective 0 maximised, objective 1 minimised: t0 (high, low) dominates everyone.
    entries = table((0.9, 0.1), (0.8, 0.2), (0.95, 0.5), (0.5, 0.9))
    assert fronts([(-0.9, 0.1), (-0.8, 0.2), (-0.95, 0.5), (-0.5, 0.9)]) == [[0, 2], [1], [3]]
    assert order(entries, ("max", "min"))[:2] in (["t0", "t2"], ["t2", "t0"])
    assert order(entries, ("max", "min"))[2:] == ["t1", "t3"]
    # All maximised, t3's 0.9 is now good: t3 and t2 and t0 share the first front.
    assert order(entries, MAXMAX)[-1] == "t1"


def test_crowding_breaks_ties_within_a_front_then_arrival() -> None:
    # One front of 4 points on a line: the extremes are infinite, the middle one with
    # more room wins; two identical middles would go by arrival.
    points = [(0.0, 1.0), (0.1, 0.9), (0.5, 0.5), (1.0, 0.0)]
    dist = crowding(points, [0, 1, 2, 3])
    assert dist[0] == dist[3] == math.inf
    assert dist[1] == pytest.approx(0.5 / 1 + 0.5 / 1)  # (0.5-0)/1 twice
    assert dist[2] == pytest.approx(0.9 + 0.9)
    entries = [RungEntry(f"t{i}", i, (-x, -y)) for i, (x, y) in enumerate(points)]
    assert order(entries) == ["t0", "t3", "t2", "t1"]
    ties = table((0.5, 0.5), (0.5, 0.5), (0.5, 0.5))
    assert order(ties) == ["t0", "t1", "t2"]  # equal points do not dominate each other
    assert judge(ties, "t1", MAXMAX, 2).keep and not judge(ties, "t2", MAXMAX, 2).keep


def test_constraints_first_infeasible_after_feasible() -> None:
    # t0 would dominate everything but violates a constraint; by violation among infeasible.
    entries = table((0.99, 0.99), (0.1, 0.1), (0.98, 0.98), violation={0: 0.3, 2: 0.1})
    ranked = rank(entries, MAXMAX)
    assert [e.key for e, _ in ranked] == ["t1", "t2", "t0"]
    assert ranked[1][1] == ranked[2][1] == "infeasible"
    verdict = judge(entries, "t0", MAXMAX, 3)
    assert (verdict.keep, verdict.position, verdict.n, verdict.kept) == (False, 2, 3, 1)


def test_nan_objective_ranks_last() -> None:
    entries = table((NAN, 0.99), (0.1, 0.1), (0.2, 0.0), violation={2: 5.0})
    ranked = rank(entries, MAXMAX)
    assert [e.key for e, _ in ranked] == ["t1", "t2", "t0"]
    assert ranked[-1][1] == "objective is NaN"


def test_keeps_ceil_of_n_over_eta() -> None:
    entries = table((0.1, 0.1), (0.2, 0.2), (0.3, 0.3), (0.4, 0.4))
    kept = [e.key for e in entries if judge(entries, e.key, MAXMAX, 3).keep]
    assert kept == ["t2", "t3"]  # ceil(4 / 3) = 2
    assert judge(entries[:1], "t0", MAXMAX, 3).keep  # the first at a rung always continues


@given(
    st.lists(
        st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(0, 1)), min_size=1, max_size=9
    ),
    st.integers(2, 4),
)
def test_ranking_is_a_permutation_fronts_respect_dominance(rows, eta) -> None:
    entries = [
        RungEntry(f"t{i}", i, (a, b), v if v > 0.5 else 0.0) for i, (a, b, v) in enumerate(rows)
    ]
    ranked = [e for e, _ in rank(entries, ("max", "min"))]
    assert sorted(e.key for e in ranked) == sorted(e.key for e in entries)
    pos = {e.key: i for i, e in enumerate(ranked)}
    for a, b in itertools.permutations(entries, 2):
        if a.violation == 0 and b.violation == 0:
            x, y = (-a.values[0], a.values[1]), (-b.values[0], b.values[1])
            if all(p <= q for p, q in zip(x, y, strict=True)) and x != y:
                assert pos[a.key] < pos[b.key]
        if a.violation == 0 < b.violation:
            assert pos[a.key] < pos[b.key]
    kept = sum(judge(entries, e.key, ("max", "min"), eta).keep for e in entries)
    assert kept == math.ceil(len(entries) / eta)


def scheduler(**kw) -> MoAshaScheduler:
    return MoAshaScheduler(
        (Objective("r2", "max"), Objective("monoscore_mean", "max")),
        (Constraint("dead_fraction", "<=", 0.2),),
        grace_epochs=kw.get("grace", 1),
        reduction_factor=kw.get("eta", 2),
        default_epochs=kw.get("epochs", 8),
    )


def report(s: MoAshaScheduler, key: str, epoch: int, r2: float, mono: float, dead=0.0):
    """Optuna trial `key`'s result at `epoch`, run alone in a Tune trial."""
    trial = SimpleNamespace(trial_id=f"ray-{key}", config={"epochs": 8, TRIAL_KEY: key})
    result = {"epoch": epoch, "r2": r2, "monoscore_mean": mono, "dead_fraction": dead}
    return s.on_trial_result(None, trial, result)


def test_late_arrival_is_judged_against_everything_recorded_so_far() -> None:
    s = scheduler()
    assert report(s, "a", 1, 0.5, 0.5) == "CONTINUE"  # alone at rung 1 (epoch 1)
    assert report(s, "a", 2, 0.5, 0.5) == "CONTINUE"  # alone at rung 2
    assert report(s, "a", 3, 0.5, 0.5) == "CONTINUE"  # no rung at epoch 3
    assert report(s, "b", 1, 0.9, 0.9) == "CONTINUE"  # better than a: kept (1 of 2)
    assert report(s, "c", 1, 0.1, 0.1) == "STOP"  # late at rung 1: ceil(3/2)=2, it is third
    assert s.stopped["c"][1] == "rung 1 (epoch 1): dominated (front 3), rank 3 of 3, kept 2"
    # An infeasible trial at rung 2 with a and b's company: stopped though its values are best.
    assert report(s, "b", 2, 0.9, 0.9) == "CONTINUE"
    assert report(s, "d", 1, 0.95, 0.95, dead=0.5) == "STOP"
    assert "infeasible" in s.stopped["d"][1]
    # Earlier verdicts stand: a stays in the table at rung 1 though it would now be cut.
    assert set(s.rungs[1]) == {"a", "b", "c", "d"} and "a" not in s.stopped


def test_a_verdict_is_final_and_a_rerun_keeps_its_place() -> None:
    s = scheduler()
    report(s, "a", 1, 0.9, 0.9)
    report(s, "b", 1, 0.1, 0.1)
    assert s.stopped["b"][0] == 1
    # Re-run from an older checkpoint (resume, retry): stopped again, better or not.
    assert report(s, "b", 1, 0.95, 0.95) == "STOP"
    assert report(s, "b", 2, 0.95, 0.95) == "STOP"
    # A kept trial reported again (a restored trial re-reports its checkpoint's epoch) stays
    # kept in its old place, though b's rerun now ranks above it and the table would cut it.
    assert report(s, "a", 1, 0.8, 0.8) == "CONTINUE"
    assert "a" not in s.stopped
    assert len(s.rungs[1]) == 2 and s.rungs[1]["a"].order == 0
    assert judge(list(s.rungs[1].values()), "a", MAXMAX, 2).keep is False


def test_state_round_trips() -> None:
    s = scheduler()
    report(s, "a", 1, 0.9, 0.9)
    report(s, "b", 1, 0.1, NAN)
    report(s, "d", 1, 0.95, 0.95)
    t = scheduler()
    t.set_state(s.get_state())
    assert t.stopped == s.stopped and t.rungs.keys() == s.rungs.keys()
    assert t.rungs[1]["a"] == s.rungs[1]["a"] and math.isnan(t.rungs[1]["b"].values[1])
    assert report(scheduler(), "c", 1, 0.05, 0.05) == "CONTINUE"  # alone at the rung
    assert report(t, "c", 1, 0.05, 0.05) == "STOP"  # judged against the restored table


BASE = {
    "kind": "sae",
    "fixed": {"d_sae": 64, "epochs": 4},
    "search": {"mono_coef": {"type": "loguniform", "low": 1e-3, "high": 1.0}},
}


def space_with(tmp_path: Path, scheduler_doc: object):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**BASE, "scheduler": scheduler_doc}))
    return load_space(path)


def test_scheduler_key(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_space(path).scheduler.type == "fifo"  # default: no stopping
    s = space_with(tmp_path, {"type": "mo_asha", "grace_epochs": 2, "reduction_factor": 3})
    assert (s.scheduler.type, s.scheduler.grace_epochs, s.scheduler.reduction_factor) == (
        "mo_asha",
        2,
        3,
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"type": "asha"}, "scheduler.type: expected one of fifo, mo_asha, got 'asha'"),
        (
            {"type": "mo_asha", "grace": 2},
            "scheduler.grace: unknown key (did you mean 'grace_epochs'?",
        ),
        (
            {"type": "mo_asha", "grace_epochs": 0},
            "scheduler.grace_epochs: expected an integer >= 1",
        ),
        (
            {"type": "mo_asha", "reduction_factor": 1},
            "scheduler.reduction_factor: expected an integer >= 2",
        ),
        (
            {"type": "mo_asha", "reduction_factor": 2.5},
            "scheduler.reduction_factor: expected an integer",
        ),
        (
            {"grace_epochs": 2},
            "scheduler: expected no grace_epochs/reduction_factor with type fifo",
        ),
        ("mo_asha", "scheduler: expected a mapping"),
    ],
)
def test_bad_scheduler_is_one_line(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(InputError) as err:
        space_with(tmp_path, doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def _bench():
    import importlib.util

    path = Path(__file__).parents[1] / "bench" / "early_stopping.py"
    spec = importlib.util.spec_from_file_location("bench_early_stopping", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_hypervolume_against_hand_values() -> None:
    hv = _bench().hypervolume_2d
    # Staircase of (0.9, 0.2), (0.5, 0.6), (0.2, 0.8) above (0, 0):
    # 0.9*0.2 + 0.5*(0.6-0.2) + 0.2*(0.8-0.6) = 0.18 + 0.2 + 0.04.
    assert hv([(0.9, 0.2), (0.5, 0.6), (0.2, 0.8)], (0.0, 0.0)) == pytest.approx(0.42)
    # A dominated point and points below the reference add nothing.
    assert hv([(0.9, 0.2), (0.5, 0.6), (0.2, 0.8), (0.4, 0.1), (-1, 5), (5, -1)], (0, 0)) == (
        pytest.approx(0.42)
    )
    assert hv([(0.5, 0.5)], (0.1, 0.2)) == pytest.approx(0.4 * 0.3)
    assert hv([], (0.0, 0.0)) == 0.0


def test_resume_takes_every_verdict_the_study_holds(tmp_path: Path) -> None:
    """Optuna hears of a stop at once; Tune's snapshot (and the rung state) may be older."""
    import optuna
    from optuna.trial import TrialState

    from monoray.sweep.moasha import MoAshaRecorder
    from monoray.sweep.search import STOPPED_ATTR, STOPPED_EPOCH_ATTR, storage_for

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(
        study_name="s", storage=storage_for(url), directions=["maximize", "maximize"]
    )
    late = study.ask()  # trial 0, stopped
    late.set_user_attr(STOPPED_ATTR, "rung 1 (epoch 1): infeasible, rank 2 of 2, kept 1")
    late.set_user_attr(STOPPED_EPOCH_ATTR, 1)
    study.tell(late, state=TrialState.PRUNED)
    study.tell(study.ask(), [0.5, 0.5])  # trial 1, complete
    s = scheduler()
    report(s, "a", 1, 0.9, 0.9)
    recorder = MoAshaRecorder(s, tmp_path / "rungs.json", "s", url, packed=False)
    fresh = scheduler()
    restored = MoAshaRecorder(fresh, tmp_path / "rungs.json", "s", url, packed=False)
    restored.set_state(recorder.get_state())
    assert fresh.stopped == {"0": (1, "rung 1 (epoch 1): infeasible, rank 2 of 2, kept 1")}
    assert set(fresh.rungs[1]) == {"a"}
    assert report(fresh, "0", 1, 0.99, 0.99) == "STOP"  # the study's verdict stands
