"""MonoLoss (paper §3.3, spec §3): differentiable batch MonoScore, dense and sparse.

On a batch of B rows, with min and max taken over the batch (gradients flow
through them; ties share the gradient equally, exactly like `torch.amin` /
`torch.amax`):

    L_mono = 1 - mean_{k active} MS_k^(batch),     L_mono = 1 if no latent is active,

where `MS^(batch)` is the linear MonoScore of `monoscore.py` on the batch and a
latent is active iff `r_k > 0`, `den_k > eps` and `den_k > DEN_RTOL·scale_k²`
(the shared zero rule). `den_k = Σ_{n<m} ã_kn ã_km` is measured in normalised
units (ã ∈ [0, 1]), so `eps` does not depend on the activation scale. A latent
with `den <= eps` has essentially one activating sample in the batch: its
score is a ratio of two vanishing numbers whose gradient grows like 1/den, so
it is excluded. No branch ever divides by zero, so the loss and its gradient
are never NaN (constant latents, a batch of one, all-zero latents). The set of
active latents is a non-differentiable selection; the count is a constant.

Embeddings are frozen features: they are detached (never receive gradients).
An all-zero embedding row has `h = 0` (similarity 0 with every sample, as in
`monoscore`); its activations still count in min, max and the denominator.
Everything is computed in float64 (`precision="float32"` moves only the
O(nnz·d) products to float32; a test bounds its error by their rounding); the
loss is returned in the activations' dtype, connected to the graph.

Two paths:
- dense activations: plain autograd over float64 ops; the batch GEMM
  `ÃᵀH` dominates (forward and backward ~2·B·M·d flops each).
- sparse activations (torch COO/CSR via `mono_loss`, or `mono_loss_rows` for raw
  CSR-like arrays): a custom autograd function computes the raw statistics
  S1, S2, `||P_k||²`, `P_k·Hsum`, min, max from the stored values only (one
  SpMM, O(nnz·d)), and its backward returns the gradient w.r.t. the stored
  values only, via one sampled dense-dense product:

      dL/da_ik = dL/dS1_k + 2 a_ik dL/dS2_k + 2 (h_i·P_k) dL/dq_k
                 + (h_i·Hsum) dL/dt_k + min/max tie terms.

  Entries that are not stored get no gradient: the gradient equals the dense
  path's gradient restricted to the stored entries (for TopK/ReLU latents the
  unstored entries receive zero gradient upstream anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from monoray.errors import InputError
from monoray.metrics._checks import (
    as_tensor,
    check_2d_float,
    check_activations,
    check_finite_dense,
    check_rows,
    is_sparse,
    to_triplets,
    unit_rows_and_zeros,
)
from monoray.metrics.monoscore import (
    col_sum,
    column_stats,
    csr,
    finish_scores,
    index_dtype,
    zero_rows_removed,
)

__all__ = ["DEFAULT_EPS", "mono_loss", "mono_loss_rows"]

DEFAULT_EPS = 1e-6
"""Default absolute floor on the normalised batch denominator `Σ_{n<m} ã ã`."""

Precision = Literal["float64", "float32"]
PRECISIONS: tuple[str, ...] = ("float64", "float32")

_F64 = torch.float64
_BLOCK_BYTES = 8 << 20  # P = AᵀH is built in latent blocks of at most 8 MiB


def _loss_from_parts(
    num: Tensor, den: Tensor, u: Tensor, mn: Tensor, rs: Tensor, spread: Tensor, n: int, eps: float
) -> Tensor:
    scores, active = finish_scores(num, den, u, mn, rs, spread, float(n), eps=eps)
    count = active.sum(-1).clamp(min=1).to(_F64)
    return 1.0 - scores.sum(-1) / count


def check_eps(eps: float) -> float:
    """`eps` as a float; raises unless it is finite and >= 0."""
    eps = float(eps)
    if not eps >= 0.0 or eps == float("inf"):
        raise InputError(f"eps: must be a finite number >= 0, got {eps}")
    return eps


def loss_inputs(embeddings: object, activations: object) -> tuple[Tensor, Tensor, Tensor]:
    """`(h, zero, a)`: float64 unit-norm embeddings on the activations' device, their
    `zero_row_weights` [B] and the activations (dense or sparse), checked for shape and
    row count. Finiteness is the caller's."""
    e = as_tensor(embeddings, "embeddings")
    check_2d_float(e, "embeddings")
    a = check_activations(activations)
    check_rows("embeddings", int(e.shape[0]), "activations", int(a.shape[0]))
    return *unit_rows_and_zeros(e.to(a.device)), a


def _work_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return getattr(torch, precision)


# ---------------------------------------------------------------- dense path
# The pieces are shared with `distributed_loss.mono_loss_global`, which sums
# `dense_stats` over ranks between the two ends.
def safe_range(mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """`(r_safe, spread)`: `r = max - min` where `r > 0`, else 1; and the detached mask `r > 0`."""
    r = mx - mn
    spread = (r > 0).detach()
    return torch.where(spread, r, torch.ones_like(r)), spread


def dense_stats(
    h: Tensor, zero: Tensor, x: Tensor, mn: Tensor, rs: Tensor, work: torch.dtype = _F64
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(u, v, vh, W)` of `Ã = (x - min) / r_safe`: `Σ ã`, `Σ ã²`, `Σ ||h||² ã²` [M]
    (`v` less the share of the all-zero rows, `zero` [B]) and `ÃᵀH` [M, d] (GEMM in `work`).
    `x` may be [..., B, M] (`mn`, `rs` [..., 1, M]): one set of statistics per leading index."""
    at = (x - mn) / rs
    u = at.sum(-2)
    sq = at * at
    v = sq.sum(-2)
    vh = v - zero @ sq  # exactly v without zero rows
    w = (at.mT.to(work) @ h.to(work)).to(_F64)
    return u, v, vh, w


def loss_from_stats(
    u: Tensor,
    v: Tensor,
    vh: Tensor,
    w: Tensor,
    mn: Tensor,
    rs: Tensor,
    spread: Tensor,
    n: int,
    eps: float,
) -> Tensor:
    """The float64 MonoLoss of a batch of `n` rows from its `dense_stats` (one per leading
    index of [..., M] statistics)."""
    q = (w * w).sum(-1)
    return _loss_from_parts(0.5 * (q - vh), 0.5 * (u * u - v), u, mn, rs, spread, n, eps)


def _dense_loss(h: Tensor, zero: Tensor, a: Tensor, eps: float, work: torch.dtype) -> Tensor:
    """MonoLoss of dense activations [..., B, M] of the batch whose unit embeddings are `h`
    (one loss per leading index)."""
    x = a.to(_F64)
    mn, mx = torch.amin(x, -2), torch.amax(x, -2)
    rs, spread = safe_range(mn, mx)
    u, v, vh, w = dense_stats(h, zero, x, mn.unsqueeze(-2), rs.unsqueeze(-2), work)
    return loss_from_stats(u, v, vh, w, mn, rs, spread, int(x.shape[-2]), eps).to(a.dtype)


def stacked_mono_loss(
    embeddings: Tensor,
    activations: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    precision: Precision = "float64",
) -> Tensor:
    """[P] `mono_loss` of each of P dense activation matrices [P, B, M] of one batch (its
    embeddings [B, d]): the dense path's arithmetic, run once for all P. No input checks
    (a packed step's own latents; a NaN shows in that member's loss)."""
    h, zero = unit_rows_and_zeros(embeddings)
    return _dense_loss(h, zero, activations, check_eps(eps), _work_dtype(precision))


# --------------------------------------------------------------- sparse path
@dataclass(frozen=True, slots=True)
class _Plan:
    """Index structure of a sparse batch (no gradients): the entries and Aᵀ as CSR."""

    row: Tensor  # [nnz] row of each entry, non-decreasing
    col: Tensor  # [nnz] column of each entry
    perm: Tensor  # [nnz] entry order sorted by (col, row)
    at_crow: Tensor  # [M+1] row offsets of Aᵀ
    at_col: Tensor  # [nnz] = row[perm]
    counts: Tensor  # [M] stored entries per column
    n_rows: int
    n_cols: int
    blocks: tuple[tuple[int, int, int, int], ...]  # latent blocks (k0, k1, lo, hi) of Aᵀ
    name: str  # the argument holding the values, for error messages


def _make_plan(
    row: Tensor,
    col: Tensor,
    n_rows: int,
    n_cols: int,
    d: int,
    name: str,
    value_name: str,
) -> _Plan:
    idt = index_dtype(n_rows * n_cols)
    skey, perm = torch.sort(col.to(idt) * n_rows + row.to(idt))
    if skey.numel() > 1 and bool((skey[1:] == skey[:-1]).any()):
        j = int(torch.nonzero(skey[1:] == skey[:-1])[0, 0])
        k = int(skey[j])
        raise InputError(f"{name}: duplicate entry at row {k % n_rows}, column {k // n_rows}")
    counts = torch.bincount(col, minlength=n_cols)
    at_crow = torch.zeros(n_cols + 1, dtype=idt, device=col.device)
    torch.cumsum(counts, 0, out=at_crow[1:])
    step = max(1, _BLOCK_BYTES // (8 * d))
    ks = [*range(0, n_cols, step), n_cols]
    offs = at_crow[torch.tensor(ks, device=at_crow.device)].tolist()
    blocks = tuple((ks[i], ks[i + 1], offs[i], offs[i + 1]) for i in range(len(ks) - 1))
    at_col = (skey % n_rows) if n_rows > 0 else skey  # = row[perm], in the index dtype
    return _Plan(row, col, perm, at_crow, at_col, counts, n_rows, n_cols, blocks, value_name)


class _SparseMonoStats(torch.autograd.Function):
    """values [nnz] -> (S1, S2, q_raw = ||P_k||², t = P_k·Hsum, min, max), all [M] float64.

    `P = Aᵀ H` is built one latent block at a time into one reused buffer
    (a few MiB, cache-resident) and never materialised whole: each block gives
    its `||P_k||²` and, when a gradient is needed, the sampled products
    `h_i·P_k` at the block's stored entries, which is all the backward needs
    from P. The backward is then one gather and one row-wise dot product:
    `grad = <coef[col], X>` with per-entry factors X saved by the forward.
    """

    @staticmethod
    def forward(ctx, values: Tensor, h: Tensor, hw: Tensor, hdot: Tensor, plan: _Plan):  # type: ignore[override]
        v = values.detach().to(_F64)
        m, b = plan.n_cols, plan.n_rows
        s1, s2, mn, mx, _ = column_stats(plan.col, v, b, m)
        if not bool(torch.isfinite(s2).all()):  # NaN/inf values (or |a| > 1e150)
            _raise_bad_values(v, plan.row, plan.name)
        # The O(nnz·d) products run in hw's dtype (see `precision`); the rest in float64.
        vt = v[plan.perm].to(hw.dtype)  # values of Aᵀ in its CSR (column-major) order
        need_grad = bool(ctx.needs_input_grad[0])
        sdd_t = torch.empty_like(vt) if need_grad else None
        p_norm = torch.empty(m, dtype=hw.dtype, device=v.device)
        width = max(k1 - k0 for k0, k1, _, _ in plan.blocks)
        buf = torch.empty(width, hw.shape[1], dtype=hw.dtype, device=v.device)
        h_t = hw.T
        for k0, k1, lo, hi in plan.blocks:
            crow = plan.at_crow[k0 : k1 + 1] - lo
            pb = buf[: k1 - k0]
            at_b = csr(crow, plan.at_col[lo:hi], vt[lo:hi], (k1 - k0, b))
            torch.addmm(pb, at_b, hw, beta=0.0, out=pb)  # P[k0:k1]; beta=0: no zero-fill pass
            torch.linalg.vector_norm(pb, dim=1, out=p_norm[k0:k1])  # ||P_k||
            if need_grad and hi > lo:
                pattern = csr(crow, plan.at_col[lo:hi], vt[lo:hi], (k1 - k0, b))  # beta=0
                sdd_t[lo:hi] = torch.sparse.sampled_addmm(pattern, pb, h_t, beta=0.0).values()
        q_raw = p_norm.to(_F64).square_()
        hdot_e = hdot[plan.row]  # h_i·Hsum at each entry
        t = col_sum(plan.col, v * hdot_e, m)
        if need_grad:
            # Per-entry factors of dL/da_ik = <(dS1, dS2, dq, dt, dmin, dmax)_k, X_i>.
            x = torch.empty(v.numel(), 6, dtype=_F64, device=v.device)
            x[:, 0] = 1.0
            torch.mul(v, 2.0, out=x[:, 1])
            x[plan.perm, 2] = sdd_t.to(_F64)
            x[:, 2] *= 2.0
            x[:, 3] = hdot_e
            implicit = b - plan.counts  # unstored (zero) entries per column
            for j, ext in ((4, mn), (5, mx)):
                # torch.amin/amax semantics: the gradient is shared equally by all tied
                # entries, including the unstored zeros when the extreme is 0.
                tie = (v == ext[plan.col]).to(_F64)
                ties = col_sum(plan.col, tie, m)
                ties += torch.where(ext == 0, implicit, 0).to(_F64)
                torch.div(tie, ties.clamp(min=1.0)[plan.col], out=x[:, j])
            ctx.save_for_backward(x)
        ctx.plan = plan
        ctx.in_dtype = values.dtype
        return s1, s2, q_raw, t, mn, mx

    @staticmethod
    def backward(ctx, g1: Tensor, g2: Tensor, gq: Tensor, gt: Tensor, gmn: Tensor, gmx: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        coef = torch.stack([g1, g2, gq, gt, gmn, gmx], dim=1)  # [M, 6]
        grad = torch.linalg.vecdot(coef.index_select(0, ctx.plan.col), x)
        return grad.to(ctx.in_dtype), None, None, None, None


def _raise_bad_values(v: Tensor, row: Tensor, name: str) -> None:
    ok = torch.isfinite(v)
    if not bool(ok.all()):
        j = int(torch.nonzero(~ok)[0, 0])
        what = "NaN" if bool(torch.isnan(v[j])) else "inf"
        raise InputError(f"{name}: contains {what} at row {int(row[j])}")
    raise InputError(f"{name}: values too large for float64 statistics (|a| > 1e150)")


def _sparse_loss(
    h: Tensor,
    zero: Tensor,
    values: Tensor,
    plan: _Plan,
    eps: float,
    out_dtype: torch.dtype,
    work: torch.dtype,
) -> Tensor:
    n = plan.n_rows
    hsum = h.sum(0)
    hdot = h @ hsum
    s1, s2, q_raw, t, mn, mx = _SparseMonoStats.apply(values, h, h.to(work), hdot, plan)
    r = mx - mn
    spread = (r > 0).detach()
    rs = torch.where(spread, r, torch.ones_like(r))
    rs2 = rs * rs
    u = (s1 - n * mn) / rs
    v = (s2 - mn * (2.0 * s1 - n * mn)) / rs2
    q = (q_raw - mn * (2.0 * t - mn * (hsum @ hsum))) / rs2
    # The all-zero rows' share of v, from their stored values (differentiable gathers).
    x = values.to(_F64)
    xz = zero[plan.row] * x
    zs1 = torch.zeros_like(s1).index_add(0, plan.col, xz)
    zs2 = torch.zeros_like(s2).index_add(0, plan.col, xz * x)
    vh = zero_rows_removed(v, zs1, zs2, zero.sum(), mn, rs)
    loss = _loss_from_parts(0.5 * (q - vh), 0.5 * (u * u - v), u, mn, rs, spread, n, eps)
    return loss.to(out_dtype)


# ------------------------------------------------------------------- public
def mono_loss(
    embeddings: object,
    activations: object,
    *,
    eps: float = DEFAULT_EPS,
    precision: Precision = "float64",
) -> Tensor:
    """Batch MonoLoss `1 - mean_{active k} MS_k` (scalar, activations' dtype).

    embeddings [B, d] (frozen; detached), activations [B, M] dense or torch
    sparse COO/CSR. For sparse input the gradient flows to the stored values
    (`values()` of a coalesced COO or a CSR tensor keeps the autograd link in
    torch 2.15; an uncoalesced COO is coalesced differentiably first) and the
    cost is O(nnz·d) instead of O(B·M·d).

    `precision="float32"` runs the O(nnz·d) products (`P = ÃᵀH` and the sampled
    `h_i·P_k`) in float32 and everything else in float64: ~2.5x faster on CPU,
    for a per-latent score error of about `n·2⁻²⁴·scale_k²/den_k` (bounded in
    `tests/test_metrics_loss.py`).
    """
    eps, work = check_eps(eps), _work_dtype(precision)
    h, zero, a = loss_inputs(embeddings, activations)
    if not is_sparse(a):
        check_finite_dense(a.detach(), "activations")
        return _dense_loss(h, zero, a, eps, work)
    t = to_triplets(a)  # finiteness is checked inside the statistics pass
    plan = _make_plan(
        t.row, t.col, t.n_rows, t.n_cols, int(h.shape[1]), "activations", "activations"
    )
    return _sparse_loss(h, zero, t.val, plan, eps, a.dtype, work)


def mono_loss_rows(
    embeddings: object,
    values: Tensor,
    col_indices: Tensor,
    row_offsets: Tensor,
    n_latents: int,
    *,
    eps: float = DEFAULT_EPS,
    precision: Precision = "float64",
) -> Tensor:
    """Sparse MonoLoss from CSR-like arrays, without building a torch sparse tensor.

    Row i of the [B, n_latents] activation matrix stores `values[j]` at column
    `col_indices[j]` for `j in range(row_offsets[i], row_offsets[i+1])`; other
    entries are 0. Columns within a row may be in any order but must be
    unique. `values` [nnz] (float, carries the gradient), `col_indices` [nnz]
    (int), `row_offsets` [B+1] (int, starts at 0, non-decreasing, ends at nnz).
    Same value and gradient as `mono_loss` on the equivalent sparse tensor.

    TopK output `vals, idx = z.topk(k, dim=1)` (B rows, k each) maps to
    `mono_loss_rows(x, vals.relu().reshape(-1), idx.reshape(-1),
    torch.arange(0, B*k + 1, k), n_latents)`. `precision` as in `mono_loss`.
    """
    eps, work = check_eps(eps), _work_dtype(precision)
    e = as_tensor(embeddings, "embeddings")
    check_2d_float(e, "embeddings")
    if not isinstance(values, Tensor) or values.dim() != 1 or not values.dtype.is_floating_point:
        raise InputError("values: expected a 1-D floating-point tensor")
    if (
        not isinstance(col_indices, Tensor)
        or col_indices.dim() != 1
        or col_indices.dtype.is_floating_point
    ):
        raise InputError("col_indices: expected a 1-D integer tensor")
    if (
        not isinstance(row_offsets, Tensor)
        or row_offsets.dim() != 1
        or row_offsets.dtype.is_floating_point
    ):
        raise InputError("row_offsets: expected a 1-D integer tensor")
    m, nnz = int(n_latents), int(values.numel())
    if m < 1:
        raise InputError(f"n_latents: must be >= 1, got {n_latents}")
    if col_indices.numel() != nnz:
        raise InputError(f"values has {nnz} entries but col_indices has {col_indices.numel()}")
    b = int(row_offsets.numel()) - 1
    check_rows("embeddings", int(e.shape[0]), "row_offsets (minus one)", b)
    crow = row_offsets.to(device=values.device, dtype=torch.int64)
    counts = crow.diff()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or (counts.numel() and int(counts.min()) < 0):
        raise InputError(f"row_offsets: must start at 0, be non-decreasing and end at nnz={nnz}")
    col = col_indices.to(device=values.device, dtype=torch.int64)
    lo_hi = torch.aminmax(col) if nnz else None
    if lo_hi is not None and (int(lo_hi.min) < 0 or int(lo_hi.max) >= m):
        raise InputError(f"col_indices: index out of range [0, {m})")
    row = torch.repeat_interleave(torch.arange(b, device=col.device), counts, output_size=nnz)
    h, zero = unit_rows_and_zeros(e.to(values.device))
    plan = _make_plan(row, col, b, m, int(h.shape[1]), "col_indices", "values")
    return _sparse_loss(h, zero, values, plan, eps, values.dtype, work)
