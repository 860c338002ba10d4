"""MonoLoss of the global batch across torch.distributed ranks (spec §3, "Distributed").

Each of W ranks holds B_r rows of dense activations [B_r, M] and embeddings
[B_r, d]. `mono_loss_global` gives every rank exactly `mono_loss` of the
concatenated batch (rows of rank 0, then rank 1, ...), and the gradient with
respect to a rank's local activations is the matching rows of the
single-process gradient. Method (all statistics float64):

1. Global column min/max: one all_reduce(MIN) of `(min, -max)`; its custom
   backward reproduces `torch.amin/amax` across ranks: the gradient of a tied
   extreme is shared equally by all tied entries on all ranks (see
   `_GlobalExtremes`). Only ties at the minimum matter in practice: MonoScore
   is invariant to scaling ã, so dL/dmax is 0 up to rounding.
2. Each rank normalises its rows with the global min/range and forms its share
   of the statistics `u = Σ ã`, `v = Σ ã²` [M] and `W = ÃᵀH` [M, d]
   (`dense_stats`, shared with `mono_loss`).
3. One all_reduce(SUM) of `(u, v, vh, W, n)` (`vh`: `v` without the all-zero
   embedding rows) whose backward is the identity
   (`_SumAcrossRanks`), then the loss is finished locally from the totals
   (`loss_from_stats`, shared with `mono_loss`); every rank computes the same
   value.

Collectives per call: forward three all_reduces (a 7-number header that
checks the inputs agree, 2M numbers for min/max, M(d+3)+1 float64 numbers for
the statistics: 8 MiB at M = 2048, d = 512); backward one all_reduce of 4M
numbers. Every rank of `group` must call it with the same `eps`, in the same
order relative to other collectives on that group, and must backpropagate the
same multiple of the loss (see below). Tensors must live where the group's backend can reduce them (gloo: CPU;
NCCL: CUDA, on `torch.cuda.current_device()`, which also holds the header).

Input errors raise `InputError` on every rank instead of hanging: each rank
runs its local checks (shapes, dtype, dense layout, NaN/inf, matching rows,
eps) before any collective, then all ranks exchange the header `(M, d, eps,
failed rank)`; the failing rank re-raises its own message (with its rank), the
others name it, and a disagreement on M, d or eps is reported on all ranks.
What cannot be caught: a rank that never calls `mono_loss_global` (the others
wait in the header collective until the process group's timeout), and a rank
that backpropagates a different multiple of the loss (silently wrong
gradients).

DDP. DistributedDataParallel averages parameter gradients over the W ranks. The
gradient that reaches rank r's activations here is the rank-r share of the
gradient of the global loss, so after DDP's averaging the mono term carries
only 1/W of its gradient. For the gradient of `CE_mean_global + λ·L_mono`
(equal local batch sizes, so DDP's average of local CE means is the global CE
mean) backpropagate `ce + λ·W·L_mono` and log `ce + λ·L_mono`; or use
`mono_term_for_ddp`, whose value is `L_mono` and whose gradient is W times
larger, so one expression serves both:

    mono = mono_term_for_ddp(mono_loss_global(emb, z, eps=eps), world_size)
    loss = ce + lam * mono          # log loss.item(); loss.backward()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from monoray.errors import InputError
from monoray.metrics._checks import check_finite_dense, is_sparse
from monoray.metrics.loss import (
    DEFAULT_EPS,
    check_eps,
    dense_stats,
    loss_from_stats,
    loss_inputs,
    mono_loss,
    safe_range,
)

__all__ = ["mono_loss_global", "mono_term_for_ddp"]

_F64 = torch.float64
_SUM, _MIN, _MAX = dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX


class _GlobalExtremes(torch.autograd.Function):
    """x [B_r, M] -> (min, max) [M] over the rows of all ranks, with `torch.amin/amax` gradients.

    The incoming gradient on each rank is that rank's share of dL/dmin
    (dL/dmax): the loss reaches min/max only through the per-rank statistics
    (the caller keeps it that way), so the backward sums the shares over ranks,
    together with the per-rank tie counts in the same all_reduce, and gives each
    tied entry `total / global tie count`, as `torch.amin` does on the
    concatenated batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        m = x.shape[1]
        ext = torch.cat([torch.amin(x, 0), -torch.amax(x, 0)])
        dist.all_reduce(ext, op=_MIN, group=group)
        mn, mx = ext[:m], -ext[m:]
        ctx.save_for_backward(x == mn, x == mx)
        ctx.group = group
        return mn, mx

    @staticmethod
    def backward(ctx, g_mn: Tensor, g_mx: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        tie_mn, tie_mx = ctx.saved_tensors
        buf = torch.cat([g_mn, g_mx, tie_mn.sum(0).to(_F64), tie_mx.sum(0).to(_F64)])
        dist.all_reduce(buf, op=_SUM, group=ctx.group)
        g_mn, g_mx, n_mn, n_mx = buf.chunk(4)
        return (g_mn / n_mn) * tie_mn + (g_mx / n_mx) * tie_mx, None


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity.

    Every rank finishes the same scalar loss from the summed statistics S, so
    dL/dS is the same on every rank, and since S = Σ_r s_r it is also dL/ds_r
    for this rank's summand: passing it through unchanged is the exact
    gradient. (`torch.distributed.nn.functional.all_reduce` all-reduces the
    incoming gradients instead, which here would give W·dL/dS at the cost of a
    second M(d+2)-sized collective.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=_SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def _world_size(group: object) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    world = dist.get_world_size(group)
    if world < 1:
        raise InputError("mono_loss_global: this rank is not a member of the process group")
    return world


def _local_inputs(
    embeddings: object, activations: object, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Unit-norm float64 embeddings, their zero-row weights and the dense activations,
    validated on this rank alone."""
    check_eps(eps)
    h, zero, a = loss_inputs(embeddings, activations)
    if is_sparse(a):
        raise InputError("activations: mono_loss_global takes dense activations, got sparse")
    check_finite_dense(a.detach(), "activations")
    return h, zero, a


def _header_device(group: object) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(m: int, d: int, eps: float, error: InputError | None, group: object) -> None:
    """One small all_reduce(MAX); raises on every rank unless all inputs are valid and agree."""
    rank = dist.get_rank(group)
    failed = rank + 1 if error is not None else 0
    hdr = torch.tensor([m, -m, d, -d, eps, -eps, failed], dtype=_F64, device=_header_device(group))
    dist.all_reduce(hdr, op=_MAX, group=group)
    m_hi, m_lo, d_hi, d_lo, eps_hi, eps_lo, bad = hdr.tolist()
    if error is not None:
        raise InputError(f"{error} on rank {rank}") from error
    if bad:
        raise InputError(f"mono_loss_global: invalid input on rank {int(bad) - 1} (raised there)")
    if m_hi != -m_lo:
        raise InputError(
            f"activations: ranks disagree on the number of latents ({-m_lo:.0f} to {m_hi:.0f})"
        )
    if d_hi != -d_lo:
        raise InputError(f"embeddings: ranks disagree on the dimension ({-d_lo:.0f} to {d_hi:.0f})")
    if eps_hi != -eps_lo:
        raise InputError(f"eps: ranks disagree ({-eps_lo} to {eps_hi})")


def mono_loss_global(
    embeddings: object,
    activations: object,
    *,
    eps: float = DEFAULT_EPS,
    group: object = None,
) -> Tensor:
    """MonoLoss of the global batch, the same scalar on every rank of `group` (default: WORLD).

    embeddings [B_r, d] (frozen; detached), activations [B_r, M] dense, on
    each rank (B_r may differ). Value and gradient equal `mono_loss` of the
    concatenated batch; returned in the activations' dtype. Without an
    initialised torch.distributed, or with a group of one rank, this is
    exactly `mono_loss(embeddings, activations, eps=eps)`. Collective: every
    rank of the group must call it. For DDP see the module docstring and
    `mono_term_for_ddp`.
    """
    if _world_size(group) == 1:
        return mono_loss(embeddings, activations, eps=eps)
    error: InputError | None = None
    try:
        h, zero, a = _local_inputs(embeddings, activations, eps)
        m, d = int(a.shape[1]), int(h.shape[1])
    except InputError as err:
        error, m, d = err, 0, 0
    _agree(m, d, float(eps) if error is None else 0.0, error, group)
    x = a.to(_F64)
    mn, mx = _GlobalExtremes.apply(x, group)
    rs, spread = safe_range(mn, mx)
    u, v, vh, w = dense_stats(h, zero, x, mn, rs)
    n = torch.full((1,), x.shape[0], dtype=_F64, device=x.device)
    total = _SumAcrossRanks.apply(torch.cat([u, v, vh, w.reshape(-1), n]), group)
    u, v, vh = total[:m], total[m : 2 * m], total[2 * m : 3 * m]
    w = total[3 * m : -1].view(m, d)
    # min and range enter the finish only through the (non-differentiable) choice
    # of active latents; detached, they keep `_GlobalExtremes`' incoming
    # gradient a pure per-rank share, which its backward sums over ranks.
    loss = loss_from_stats(u, v, vh, w, mn.detach(), rs.detach(), spread, int(total[-1]), eps)
    return loss.to(a.dtype)


def mono_term_for_ddp(loss: Tensor, world_size: int) -> Tensor:
    """`loss` with its value unchanged and its gradient multiplied by `world_size`.

    For a loss from `mono_loss_global` under DistributedDataParallel, which
    divides parameter gradients by the world size: `ce + lam *
    mono_term_for_ddp(mono, W)` has the value `ce + lam * mono` (log it) and,
    after DDP's averaging, the gradient of `CE_mean_global + lam * L_mono`.
    """
    w = int(world_size)
    if w < 1:
        raise InputError(f"world_size: must be >= 1, got {world_size}")
    if w == 1:
        return loss
    # loss - loss.detach() is exactly 0 with gradient 1: the value stays bit-identical.
    return loss + (w - 1) * (loss - loss.detach())
