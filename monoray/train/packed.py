"""TEMPORARY stand-in for engineer pack's `train_pack` (same contract): members one after another.

Replaced by the real engine (branch `pack`) before the final commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monoray.data import FeatureSplits
from monoray.errors import InputError
from monoray.runs.outcome import failure_report
from monoray.train.config import TrainConfig
from monoray.train.trainer import DivergedError, train_sae


@dataclass(frozen=True)
class MemberOutcome:
    metrics: dict[str, Any] | None
    failure: dict[str, Any] | None
    stopped_epoch: int | None


MemberOnEpoch = Callable[[int, int, dict[str, Any], Path], bool]


class _Stop(Exception):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch


def train_pack(
    cfgs: Sequence[TrainConfig],
    splits: FeatureSplits,
    *,
    out_dirs: Sequence[Path],
    resume: bool = False,
    on_epoch: MemberOnEpoch | None = None,
    progress: bool | None = None,
) -> list[MemberOutcome]:
    outcomes = []
    for i, (cfg, out) in enumerate(zip(cfgs, out_dirs, strict=True)):

        def cb(epoch: int, metrics: dict[str, Any], ckpt: Path | None, i: int = i) -> None:
            if on_epoch is not None and ckpt is not None and on_epoch(i, epoch, metrics, ckpt):
                raise _Stop(epoch)

        try:
            final = train_sae(cfg, splits, out_dir=out, resume=resume, on_epoch=cb, progress=False)
            outcomes.append(MemberOutcome(final, None, None))
        except _Stop as stop:
            outcomes.append(MemberOutcome(None, None, stop.epoch))
        except (DivergedError, InputError) as err:
            outcomes.append(MemberOutcome(None, failure_report(err, rank=0), None))
    return outcomes
