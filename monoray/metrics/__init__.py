"""Exact MonoScore, MonoLoss and the evaluation metrics of monoray (spec §1-5).

- `monoscore(E, A)`: exact dataset MonoScore in one pass (float64), dense or
  torch sparse activations; `MonoScoreAccumulator` for batches / shards /
  torch.distributed ranks; `monoscore_pairwise` is the O(N²) reference.
- `mono_loss(E, A)`: differentiable batch MonoLoss (dense or sparse);
  `mono_loss_rows` takes CSR-like arrays (the SAE fast path); `stacked_mono_loss`
  the dense loss of P activation matrices of one batch at once (a packed step);
  `mono_loss_global` is the same loss over the global batch of all
  torch.distributed ranks (dense), `mono_term_for_ddp` its DDP gradient scaling.
- `class_purity`, `r2_score`, `explained_variance`, `l0`, `dead_fraction`,
  with streaming accumulators (`ClassPurityAccumulator`,
  `ReconstructionAccumulator`).
- `monoscore_summary` / `monoscore_profile`: mean (dead = 0), mean over
  active, medians, sorted profile.

Bad input raises `monoray.errors.InputError` (a `ValueError`) naming the
argument. See PERFORMANCE.md for measured costs.
"""

from monoray.metrics.distributed_loss import mono_loss_global, mono_term_for_ddp
from monoray.metrics.loss import DEFAULT_EPS, mono_loss, mono_loss_rows, stacked_mono_loss
from monoray.metrics.monoscore import (
    DEN_RTOL,
    MonoScoreAccumulator,
    MonoScoreResult,
    MonoScoreSummary,
    monoscore,
    monoscore_pairwise,
    monoscore_profile,
    monoscore_summary,
)
from monoray.metrics.purity import ClassPurityAccumulator, class_purity
from monoray.metrics.reconstruction import (
    ReconstructionAccumulator,
    dead_fraction,
    explained_variance,
    l0,
    r2_score,
)

__all__ = [
    "DEFAULT_EPS",
    "DEN_RTOL",
    "ClassPurityAccumulator",
    "MonoScoreAccumulator",
    "MonoScoreResult",
    "MonoScoreSummary",
    "ReconstructionAccumulator",
    "class_purity",
    "dead_fraction",
    "explained_variance",
    "l0",
    "mono_loss",
    "mono_loss_global",
    "mono_loss_rows",
    "mono_term_for_ddp",
    "monoscore",
    "monoscore_pairwise",
    "monoscore_profile",
    "monoscore_summary",
    "r2_score",
    "stacked_mono_loss",
]
