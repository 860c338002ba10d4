"""MO-ASHA verdicts on the members of packed trials: from the driver's scheduler to the pack.

The scheduler (`monoray.sweep.moasha`) runs in the Tune driver and judges a pack member
when that member's epoch result reaches it; the pack trains in a Tune worker (maybe on
another node), and `tune.report` does not wait for the driver to judge. The channel is
one small named actor per sweep, `VerdictBoard`, owned by the driver (it dies with it):
the scheduler publishes every verdict it gives a member at a rung (and a standing stop
whenever a stopped member reports again), and at each of a member's rung epochs the
pack waits for that member's verdict on the board, at most `VERDICT_WAIT_S`, so a
stopped member is never trained past its stop. A retried or resumed pack asks again for
the members it restores: the board holds every verdict of the sweep, those restored
with the scheduler after a driver kill included.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray

STOPPED_KEY = "monoray_stopped"
"""Result key of a stopped trial's (or pack member's) last result: where and why it stopped."""
KEEP = ""
"""The board's answer for a member kept at a rung (a stop is its non-empty reason)."""
VERDICT_WAIT_S = 300.0
"""Longest a pack waits for a member's verdict; past it the pack fails (and is retried)."""


def rung_epochs(grace: int, eta: int, epochs: int) -> tuple[int, ...]:
    """The rung epochs of a trial of `epochs` epochs: grace · η^i < epochs."""
    out, rung = [], grace
    while rung < epochs:
        out.append(rung)
        rung *= eta
    return tuple(out)


def board_name(sweep: str) -> str:
    """The named actor of sweep `sweep` (its Tune experiment name)."""
    return f"monoray-verdicts-{sweep}"


@ray.remote(num_cpus=0)
class VerdictBoard:
    """Every member verdict of one sweep (async actor: waiting callers do not block it)."""

    def __init__(self) -> None:
        self.kept: set[tuple[int, int]] = set()
        self.stops: dict[int, tuple[int, str]] = {}
        self.changed: dict[int, asyncio.Event] = {}

    async def publish(self, number: int, epoch: int, verdict: str) -> None:
        """Member `number` was kept at rung `epoch` (`KEEP`), or stopped there (the reason)."""
        if verdict == KEEP:
            self.kept.add((number, epoch))
        else:
            self.stops.setdefault(number, (epoch, verdict))
        event = self.changed.pop(number, None)
        if event is not None:
            event.set()

    def answer(self, number: int, epoch: int) -> str | None:
        stop = self.stops.get(number)
        if stop is not None and stop[0] <= epoch:
            return stop[1]
        return KEEP if (number, epoch) in self.kept else None

    async def verdict(self, number: int, epoch: int, timeout_s: float) -> str | None:
        """Member `number`'s verdict at rung `epoch` once the scheduler gave it: `KEEP` or
        the stop reason; None if none came within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (found := self.answer(number, epoch)) is None:
            event = self.changed.setdefault(number, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return self.answer(number, epoch)
        return found


def open_board(sweep: str) -> Any:
    """The driver's board for `sweep` (created once; a resumed driver creates a new one)."""
    return VerdictBoard.options(name=board_name(sweep), get_if_exists=True).remote()


@dataclass(frozen=True, slots=True)
class MemberRungs:
    """Where a pack's members are judged: `scheduler: mo_asha`'s grace and η."""

    grace: int
    eta: int

    @classmethod
    def of(cls, scheduler: Any) -> MemberRungs | None:
        """The rungs of a space's `scheduler` (None: no stopping)."""
        if scheduler.type != "mo_asha":
            return None
        return cls(scheduler.grace_epochs, scheduler.reduction_factor)

    def judge(self, sweep: str) -> MemberJudge:
        return MemberJudge(self, ray.get_actor(board_name(sweep)))


@dataclass(frozen=True, slots=True)
class MemberJudge:
    """The pack's side of the board: asks it at a member's rung epochs only."""

    rungs: MemberRungs
    board: Any

    def stop(self, number: int, epoch: int, epochs: int) -> str | None:
        """Why member `number` (of `epochs` epochs) stops after `epoch`, or None: it goes on."""
        if epoch not in rung_epochs(self.rungs.grace, self.rungs.eta, epochs):
            return None
        found = ray.get(self.board.verdict.remote(number, epoch, VERDICT_WAIT_S))
        if found is None:
            raise TimeoutError(
                f"MO-ASHA: no verdict for pack member {number} at epoch {epoch} "
                f"within {VERDICT_WAIT_S:g} s"
            )
        return found or None
