"""Pack members judged one by one: member-keyed rungs and the board a pack waits on.

Real local Ray (the session fixture): the scheduler publishes to a real `VerdictBoard`.
"""

from __future__ import annotations

from types import SimpleNamespace

import ray

from monoray.sweep.moasha import MoAshaScheduler
from monoray.sweep.search import TRIAL_KEY
from monoray.sweep.space import Constraint, Objective
from monoray.trials.packed import PACK_KEY, bundle, member_reports, pack_member
from monoray.trials.verdicts import KEEP, STOPPED_KEY, open_board


def scheduler(board_for: str) -> MoAshaScheduler:
    s = MoAshaScheduler(
        (Objective("r2", "max"), Objective("monoscore_mean", "max")),
        (Constraint("dead_fraction", "<=", 0.2),),
        grace_epochs=1,
        reduction_factor=2,
        default_epochs=8,
    )
    s.board = open_board(board_for)
    return s


PACK = SimpleNamespace(
    trial_id="pack",
    # Member 4 searched its own epochs: 2, so its only rung is epoch 1.
    config={"epochs": 8, PACK_KEY: [pack_member(3, {}), pack_member(4, {"epochs": 2})]},
)


def member(s: MoAshaScheduler, number: int, epoch: int, r2: float) -> tuple[str, dict]:
    """The scheduler's decision on a pack-epoch result holding member `number` alone, and
    that member's result as the scheduler left it."""
    report = {"epoch": epoch, "r2": r2, "monoscore_mean": r2, "dead_fraction": 0.0}
    result = bundle({number: report})
    return s.on_trial_result(None, PACK, result), member_reports(result)[number]


def verdict(s: MoAshaScheduler, number: int, epoch: int, timeout_s: float = 60.0) -> str | None:
    return ray.get(s.board.verdict.remote(number, epoch, timeout_s))


def test_members_are_contestants_the_pack_is_never_stopped(ray_session) -> None:
    s = scheduler("unit-members")
    alone = SimpleNamespace(trial_id="solo", config={"epochs": 8, TRIAL_KEY: 5})
    result = {"epoch": 1, "r2": 0.5, "monoscore_mean": 0.5, "dead_fraction": 0.0}
    assert s.on_trial_result(None, alone, result) == "CONTINUE"  # trial 5: alone at rung 1
    decision, kept = member(s, 3, 1, 0.9)
    assert decision == "CONTINUE" and STOPPED_KEY not in kept
    decision, stopped = member(s, 4, 1, 0.1)  # third at rung 1: ceil(3/2) = 2 continue
    assert decision == "CONTINUE"  # the pack goes on; member 4 stops alone
    assert list(s.rungs[1]) == ["5", "3", "4"]  # keyed by Optuna trial number, not Tune id
    assert s.stopped == {"4": (1, stopped[STOPPED_KEY])}
    assert stopped[STOPPED_KEY] == "rung 1 (epoch 1): dominated (front 3), rank 3 of 3, kept 2"
    assert verdict(s, 3, 1) == KEEP and verdict(s, 4, 1) == stopped[STOPPED_KEY]
    # Member 4 runs again (a retried pack re-reports its restored epoch): the verdict stands,
    # better or not, and holds at any later epoch; it is not judged again.
    again = member(s, 4, 1, 0.99)[1]
    assert again[STOPPED_KEY] == stopped[STOPPED_KEY] and len(s.rungs[1]) == 3
    assert verdict(s, 4, 2) == stopped[STOPPED_KEY]
    # Member 3's rungs come from the pack's epochs (8): 1, 2, 4; member 4 has no rung 2.
    assert STOPPED_KEY not in member(s, 3, 2, 0.9)[1] and list(s.rungs[2]) == ["3"]
    assert verdict(s, 3, 2) == KEEP
    assert STOPPED_KEY not in member(s, 3, 3, 0.9)[1]  # no rung at epoch 3
    assert s.on_trial_result(None, PACK, {"pack_outcomes": "{}"}) == "CONTINUE"


def test_the_board_waits_for_a_verdict_and_says_when_none_came(ray_session) -> None:
    board = open_board("unit-board")
    asked = board.verdict.remote(7, 2, 60.0)  # the pack asks before the driver judged
    ray.get(board.publish.remote(7, 1, KEEP))  # another rung's verdict does not answer it
    board.publish.remote(7, 2, "rung 2 (epoch 2): infeasible, rank 2 of 2, kept 1")
    assert ray.get(asked) == "rung 2 (epoch 2): infeasible, rank 2 of 2, kept 1"
    assert ray.get(board.verdict.remote(7, 1, 60.0)) == KEEP
    assert ray.get(board.verdict.remote(8, 1, 0.05)) is None  # nothing published for 8
    assert open_board("unit-board") == board  # one board per sweep


def test_every_member_of_one_pack_epoch_result_is_judged_on_its_own(ray_session) -> None:
    """One pack-epoch result holds both members: each is recorded and judged at its rung in
    member order, the stop is written into that member's result only."""
    s = scheduler("unit-bundle")
    result = bundle(
        {
            3: {"epoch": 1, "r2": 0.9, "monoscore_mean": 0.9, "dead_fraction": 0.0},
            4: {"epoch": 1, "r2": 0.1, "monoscore_mean": 0.1, "dead_fraction": 0.5},
        }
    )
    assert s.on_trial_result(None, PACK, result) == "CONTINUE"
    reports = member_reports(result)
    assert list(s.rungs[1]) == ["3", "4"] and STOPPED_KEY not in reports[3]
    assert reports[4][STOPPED_KEY] == "rung 1 (epoch 1): infeasible, rank 2 of 2, kept 1"
    assert verdict(s, 3, 1) == KEEP and verdict(s, 4, 1) == reports[4][STOPPED_KEY]
