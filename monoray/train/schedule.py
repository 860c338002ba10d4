"""Per-step schedules: learning-rate warm-up and decay, warm-up of λ and of the sparsity
coefficient (SAELens' `lr_scheduler_name`, `lr_warm_up_steps`, `lr_decay_steps`,
`l1_warm_up_steps`). All are off by default: constant lr, full coefficients from
the first step, as in the paper.

Every value is a closed form of the number of optimizer steps already taken
(`step`, 0 for the first step), which the checkpoint records: a resumed run
continues each schedule exactly, and there is no scheduler state to save.

    lr(step)   = lr · warm(step, lr_warm_up_steps) · decay(step)
    warm(s, W) = min(1, (s + 1) / W)             (1 when W = 0)
    decay(s)   = 1 before the last D steps of the run; on them, with
                 p = (s - (T - D) + 1) / D in (0, 1] and f = lr_end_factor,
                 linear: 1 - (1 - f)·p    cosine: f + (1 - f)·(1 + cos πp) / 2
    T = epochs · steps per epoch,  D = lr_decay_steps (0: every step after warm-up)
    mono_coef(step)     = mono_coef · warm(step, mono_warm_up_steps)
    sparsity_coef(step) = sparsity_coef · warm(step, l1_warm_up_steps)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monoray.errors import InputError

if TYPE_CHECKING:
    from monoray.sae.base import SAELoss
    from monoray.train.config import TrainConfig

LR_SCHEDULERS = ("constant", "linear", "cosine")
"""Shapes of the lr decay; "constant" (the default) has none."""


def warm(step: int, steps: int) -> float:
    """Linear warm-up factor of the step after `step` steps: (step + 1) / steps, at most 1."""
    return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


@dataclass(frozen=True, slots=True)
class Schedule:
    """The schedules of one run (`TrainConfig` fields) and its length in steps."""

    lr: float
    scheduler: str
    lr_warm_up_steps: int
    lr_decay_steps: int
    lr_end_factor: float
    mono_warm_up_steps: int
    l1_warm_up_steps: int
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        return cls(
            lr=cfg.lr,
            scheduler=cfg.lr_scheduler_name,
            lr_warm_up_steps=cfg.lr_warm_up_steps,
            lr_decay_steps=cfg.lr_decay_steps,
            lr_end_factor=cfg.lr_end_factor,
            mono_warm_up_steps=cfg.mono_warm_up_steps,
            l1_warm_up_steps=cfg.l1_warm_up_steps,
            total_steps=cfg.epochs * steps_per_epoch,
        )

    @property
    def lr_scheduled(self) -> bool:
        return self.scheduler != "constant" or self.lr_warm_up_steps > 0

    @property
    def coefs_scheduled(self) -> bool:
        return self.mono_warm_up_steps > 0 or self.l1_warm_up_steps > 0

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step taken after `step` steps."""
        factor = warm(step, self.lr_warm_up_steps)
        if self.scheduler != "constant":
            span = self.lr_decay_steps or max(1, self.total_steps - self.lr_warm_up_steps)
            p = (step - (self.total_steps - span) + 1) / span
            if p > 0:
                p, f = min(p, 1.0), self.lr_end_factor
                if self.scheduler == "linear":
                    factor *= 1.0 - (1.0 - f) * p
                else:
                    factor *= f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.lr * factor

    def scale_loss(self, loss: SAELoss, step: int) -> SAELoss:
        """`loss` with λ and the sparsity coefficient at their warm-up values for `step`."""
        return dataclasses.replace(
            loss,
            mono_coef=loss.mono_coef * warm(step, self.mono_warm_up_steps),
            sparsity_coef=loss.sparsity_coef * warm(step, self.l1_warm_up_steps),
        )


def check_schedule(cfg: TrainConfig) -> None:
    """Range checks of the schedule fields (`TrainConfig.validate` calls this)."""
    if cfg.lr_scheduler_name not in LR_SCHEDULERS:
        raise InputError(
            f"lr_scheduler_name must be one of {', '.join(LR_SCHEDULERS)}, "
            f"got {cfg.lr_scheduler_name!r}"
        )
    for key in ("lr_warm_up_steps", "lr_decay_steps", "mono_warm_up_steps", "l1_warm_up_steps"):
        if getattr(cfg, key) < 0:
            raise InputError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.lr_scheduler_name == "constant" and cfg.lr_decay_steps > 0:
        raise InputError("lr_decay_steps needs lr_scheduler_name linear or cosine")
    if not 0.0 <= cfg.lr_end_factor <= 1.0:
        raise InputError(f"lr_end_factor must be in [0, 1], got {cfg.lr_end_factor}")


def length_dependent(cfg: TrainConfig) -> bool:
    """Whether the schedule depends on the run's length (then a resume may not change epochs)."""
    return cfg.lr_scheduler_name != "constant"
