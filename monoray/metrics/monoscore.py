"""Exact MonoScore: one-pass accumulator, linear `monoscore`, pairwise reference, summaries.

Definition (spec §1). Embeddings `E` [N, d], activations `A` [N, M];
`h_n = E_n / ||E_n||` (`h_n = 0` for an all-zero row: similarity 0 with every
sample, as the reference's epsilon-normalisation gives); per latent k, `ã_kn = (a_kn - min_k) / (max_k - min_k)`
(min/max over the N samples; `ã = 0` for a constant latent);

    MS_k = Σ_{n<m} ã_kn ã_km (h_n·h_m) / Σ_{n<m} ã_kn ã_km

and `MS_k = 0` where the denominator is zero (constant latent, or a latent
whose normalised mass sits on one sample).

One-pass linear form (spec §2, §2a). The raw statistics `n`, `S1 = Σ a`,
`S2 = Σ a²`, `P_k = Σ_n a_kn h_n` ([M, d]), `Hsum = Σ h`, `min`, `max` are additive
(min/max reduce), so batches and shards merge exactly. With `r = max - min`:

    u = (S1 - n·min) / r           v = (S2 - 2·min·S1 + n·min²) / r²
    W = (P - min ⊗ Hsum) / r       q = ||W_k||²
    num = (q - vh) / 2             den = (u² - v) / 2           MS = num / den

where `vh = Σ ||h_n||² ã_n²` is `v` less the all-zero rows' share (`zero_rows_removed`).

"Denominator is zero" is decided with one rule shared by every path here
(linear, accumulator, sparse, pairwise reference, MonoLoss):

    active_k  <=>  r_k > 0  and  den_k > DEN_RTOL · scale_k²,
    scale_k = u_k + n·|min_k| / r_k,   DEN_RTOL = 1e-12.

`scale_k` bounds `Σ_n |a_kn| / r_k`, the magnitude that the float64 rounding
error of `u² - v` is proportional to, so the rule separates a true zero (error
~1e-16·scale²) from a real denominator with a wide margin. For post-ReLU
latents (`min = 0`) it reads `den > 1e-12·u²`. Conditioning: the raw-statistics
correction amplifies float64 rounding by up to about `(|min| / r)²`, so a latent
whose spread is tiny next to its offset (|min|/r ≳ 1e4) loses accuracy;
post-ReLU, TopK and JumpReLU latents have `min = 0` and lose nothing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from monoray.errors import InputError
from monoray.metrics._checks import (
    Triplets,
    as_tensor,
    check_2d_float,
    check_activations,
    check_cols,
    check_finite_dense,
    check_finite_values,
    check_rows,
    inv_row_norms,
    is_sparse,
    load_tensor_state,
    raise_nonfinite,
    to_triplets,
    unit_rows,
    zero_row_weights,
)

__all__ = [
    "DEN_RTOL",
    "MonoScoreAccumulator",
    "MonoScoreResult",
    "MonoScoreSummary",
    "monoscore",
    "monoscore_pairwise",
    "monoscore_profile",
    "monoscore_summary",
]

DEN_RTOL = 1e-12
"""Relative tolerance of the "denominator is zero" rule (see the module docstring)."""

_F64 = torch.float64
_STAT_BLOCK_ELEMS = 1 << 19  # min/max/S1/S2 in 4 MiB float64 row blocks (fastest measured)
_CONVERT_ELEMS = 1 << 21  # float64 staging buffer for non-float64 activations: 16 MiB


def finish_scores(
    num: Tensor,
    den: Tensor,
    u: Tensor,
    mn: Tensor,
    r_safe: Tensor,
    spread: Tensor,
    n: float,
    eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """`(scores, active)` from the normalised numerator/denominator (shared rule).

    `spread` is the boolean `r > 0`; `r_safe` is `r` where `spread`, else 1.
    `scores` is `num / den` on active latents and exactly 0 elsewhere; no
    division by zero happens on any branch, so autograd never sees inf/NaN.
    `eps` adds an absolute floor on `den` (MonoLoss uses it; metrics use 0).
    """
    scale = u + n * mn.abs() / r_safe
    active = spread & (den > DEN_RTOL * scale * scale)
    if eps > 0:
        active = active & (den > eps)
    active = active.detach()
    safe = torch.where(active, den, torch.ones_like(den))
    scores = torch.where(active, num / safe, torch.zeros_like(num))
    return scores, active


@dataclass(frozen=True, slots=True)
class MonoScoreResult:
    """Per-latent outcome of an exact MonoScore evaluation (all [M], float64 / bool).

    `active` marks latents with a non-zero denominator (their score is defined);
    `numerator` / `denominator` are the normalised `Σ_{n<m} ã ã s` and `Σ_{n<m} ã ã`.
    """

    scores: Tensor
    active: Tensor
    numerator: Tensor
    denominator: Tensor


class MonoScoreAccumulator:
    """Exact single-pass MonoScore over batches, mergeable across shards and processes.

    State (float64 unless noted, on `device`): `n` (int64 scalar), `s1`, `s2`,
    `min`, `max` ([M]), `p` ([M, d], `Σ_n a_n ⊗ h_n`), `h_sum` ([d]), and `zero_n`,
    `zero_s1`, `zero_s2`: count, `Σ a`, `Σ a²` over rows with all-zero embeddings. `update`
    adds a batch (dense, or torch sparse COO/CSR in O(nnz·d)); `merge` adds
    another accumulator; `all_reduce` / `reduce` do the same across
    torch.distributed ranks; `compute` returns the exact dataset MonoScore,
    equal to `monoscore_pairwise` over the concatenation of all batches.
    """

    _KEYS = ("n", "s1", "s2", "p", "h_sum", "min", "max", "zero_n", "zero_s1", "zero_s2")

    def __init__(
        self,
        dim: int,
        n_latents: int,
        *,
        device: torch.device | str | None = None,
        chunk_rows: int = 4096,
        sparse_chunk_rows: int = 1024,
    ) -> None:
        if int(dim) < 1 or int(n_latents) < 1:
            raise InputError(
                f"MonoScoreAccumulator: dim={dim} and n_latents={n_latents} must be >= 1"
            )
        if int(chunk_rows) < 1 or int(sparse_chunk_rows) < 1:
            raise InputError("MonoScoreAccumulator: chunk_rows must be >= 1")
        self.dim = int(dim)
        self.n_latents = int(n_latents)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_rows = int(chunk_rows)
        self.sparse_chunk_rows = int(sparse_chunk_rows)
        m, d, dev = self.n_latents, self.dim, self.device
        self.n = torch.zeros((), dtype=torch.int64, device=dev)
        self.s1 = torch.zeros(m, dtype=_F64, device=dev)
        self.s2 = torch.zeros(m, dtype=_F64, device=dev)
        self.p = torch.zeros(m, d, dtype=_F64, device=dev)
        self.h_sum = torch.zeros(d, dtype=_F64, device=dev)
        self.min = torch.full((m,), math.inf, dtype=_F64, device=dev)
        self.max = torch.full((m,), -math.inf, dtype=_F64, device=dev)
        # n, S1, S2 over the rows with all-zero embeddings (h = 0), see `zero_row_weights`.
        self.zero_n = torch.zeros((), dtype=_F64, device=dev)
        self.zero_s1 = torch.zeros(m, dtype=_F64, device=dev)
        self.zero_s2 = torch.zeros(m, dtype=_F64, device=dev)

    @property
    def n_samples(self) -> int:
        """Number of rows added so far (over all merged shards)."""
        return int(self.n)

    # ----------------------------------------------------------------- update
    def update(self, embeddings: object, activations: object) -> MonoScoreAccumulator:
        """Add a batch: embeddings [B, dim], activations [B, n_latents] (dense or sparse).

        Validates everything before touching the state, so a bad batch raises
        `InputError` and leaves the accumulator unchanged. Returns `self`.
        """
        e = as_tensor(embeddings, "embeddings")
        check_2d_float(e, "embeddings")
        a = check_activations(activations)
        check_rows("embeddings", int(e.shape[0]), "activations", int(a.shape[0]))
        check_cols("embeddings", int(e.shape[1]), self.dim, "dim")
        check_cols("activations", int(a.shape[1]), self.n_latents, "n_latents")
        with torch.no_grad():
            e = e.detach().to(self.device)
            inv = inv_row_norms(e)  # validates the embeddings; h is built per chunk
            a = a.detach().to(self.device)
            if is_sparse(a):
                self._update_sparse(e, inv, to_triplets(a, allow_duplicates=True))
            else:
                self._update_dense(e, inv, a)
            zero = zero_row_weights(inv)
            if bool(zero.any()):  # rare: flat patches, padding
                self._add_zero_rows(zero, a)
        return self

    def _add_zero_rows(self, zero: Tensor, a: Tensor) -> None:
        rows = torch.nonzero(zero).squeeze(1)
        if is_sparse(a):
            t = to_triplets(a).coalesced()
            pick = zero[t.row] > 0
            v = t.val[pick].to(_F64)
            self.zero_s1 += col_sum(t.col[pick], v, self.n_latents)
            self.zero_s2 += col_sum(t.col[pick], v * v, self.n_latents)
        else:
            blk = a.index_select(0, rows).to(_F64)
            self.zero_s1 += blk.sum(0)
            self.zero_s2 += (blk * blk).sum(0)
        self.zero_n += float(rows.numel())

    def _commit(
        self, n: int, s1: Tensor, s2: Tensor, mn: Tensor, mx: Tensor, h_sum: Tensor
    ) -> None:
        self.n += n
        self.s1 += s1
        self.s2 += s2
        torch.minimum(self.min, mn, out=self.min)
        torch.maximum(self.max, mx, out=self.max)
        self.h_sum += h_sum

    def _update_dense(self, e: Tensor, inv: Tensor, a: Tensor) -> None:
        n_rows, m = int(a.shape[0]), self.n_latents
        dev = self.device
        # Pass 1: min/max/S1/S2 in cache-sized row blocks (fused finiteness check).
        s1 = torch.zeros(m, dtype=_F64, device=dev)
        s2 = torch.zeros(m, dtype=_F64, device=dev)
        mn = torch.full((m,), math.inf, dtype=_F64, device=dev)
        mx = torch.full((m,), -math.inf, dtype=_F64, device=dev)
        step = max(1, _STAT_BLOCK_ELEMS // m)
        for i in range(0, n_rows, step):
            blk = a[i : i + step].to(_F64)
            torch.minimum(mn, blk.amin(0), out=mn)
            torch.maximum(mx, blk.amax(0), out=mx)
            s1 += blk.sum(0)
            s2 += (blk * blk).sum(0)
        # amin/amax propagate NaN and inf; s2 catches |a| beyond float64 squares.
        if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
            raise_nonfinite(a, "activations")
        if not bool(torch.isfinite(s2).all()):
            raise InputError("activations: values too large for float64 statistics (|a| > 1e150)")
        # Pass 2: P += A_chunkᵀ H_chunk, one float64 GEMM per chunk, straight into the
        # state. float64 activations are used in place; other dtypes go through one
        # reused float64 buffer of <= 16 MiB (no per-chunk allocation, no page faults).
        h_sum = torch.zeros(self.dim, dtype=_F64, device=dev)
        rows = self.chunk_rows
        buf = None
        if a.dtype != _F64:
            rows = max(1, min(self.chunk_rows, _CONVERT_ELEMS // m, n_rows))
            buf = torch.empty(rows, m, dtype=_F64, device=dev)
        for i in range(0, n_rows, rows):
            h = torch.mul(e[i : i + rows], inv[i : i + rows])
            h_sum += h.sum(0)
            blk = a[i : i + rows]
            if buf is not None:
                blk = buf[: blk.shape[0]].copy_(blk)
            self.p.addmm_(blk.T, h)
        self._commit(n_rows, s1, s2, mn, mx, h_sum)

    def _update_sparse(self, e: Tensor, inv: Tensor, t: Triplets) -> None:
        n_rows, m, step = t.n_rows, self.n_latents, self.sparse_chunk_rows
        bounds = torch.searchsorted(
            t.row, torch.arange(0, n_rows + step, step, device=t.row.device)
        ).tolist()
        # Per row chunk: the entries sorted by (column, row), i.e. Aᵀ in CSR order.
        # The sort also reveals duplicate entries of an uncoalesced COO input.
        chunks = []
        for ci, i in enumerate(range(0, n_rows, step)):
            lo, hi = bounds[ci], bounds[ci + 1]
            rows = min(step, n_rows - i)
            idt = index_dtype(m * rows)
            key, perm = torch.sort(t.col[lo:hi].to(idt) * rows + (t.row[lo:hi] - i).to(idt))
            if not t.unique and key.numel() > 1 and bool((key[1:] == key[:-1]).any()):
                return self._update_sparse(e, inv, t.coalesced())
            chunks.append((i, rows, lo, hi, key, perm))
        check_finite_values(t, "activations")
        v = t.val.to(_F64)
        s1, s2, mn, mx, _ = column_stats(t.col, v, n_rows, m)
        if not bool(torch.isfinite(s2).all()):
            raise InputError("activations: values too large for float64 statistics (|a| > 1e150)")
        h_sum = torch.zeros(self.dim, dtype=_F64, device=self.device)
        for i, rows, lo, hi, key, perm in chunks:
            h = torch.mul(e[i : i + rows], inv[i : i + rows])
            h_sum += h.sum(0)
            if hi == lo:
                continue
            crow = torch.zeros(m + 1, dtype=key.dtype, device=key.device)
            torch.cumsum(torch.bincount(t.col[lo:hi], minlength=m), 0, out=crow[1:])
            at = csr(crow, key % rows, v[lo:hi][perm], (m, rows))
            self.p.addmm_(at, h)
        self._commit(n_rows, s1, s2, mn, mx, h_sum)

    # ------------------------------------------------------------ merge/reduce
    def merge(self, other: MonoScoreAccumulator) -> MonoScoreAccumulator:
        """Add another accumulator's state (same dim and n_latents). Returns `self`."""
        if not isinstance(other, MonoScoreAccumulator):
            raise InputError(f"merge: expected a MonoScoreAccumulator, got {type(other).__name__}")
        if (other.dim, other.n_latents) != (self.dim, self.n_latents):
            raise InputError(
                f"merge: accumulator has dim={other.dim}, n_latents={other.n_latents} "
                f"but this one has dim={self.dim}, n_latents={self.n_latents}"
            )
        dev = self.device
        self.n += other.n.to(dev)
        self.s1 += other.s1.to(dev)
        self.s2 += other.s2.to(dev)
        self.p += other.p.to(dev)
        self.h_sum += other.h_sum.to(dev)
        self.zero_n += other.zero_n.to(dev)
        self.zero_s1 += other.zero_s1.to(dev)
        self.zero_s2 += other.zero_s2.to(dev)
        torch.minimum(self.min, other.min.to(dev), out=self.min)
        torch.maximum(self.max, other.max.to(dev), out=self.max)
        return self

    def all_reduce(self, group: object = None) -> MonoScoreAccumulator:
        """Combine the state of all ranks in place (sums, MIN, MAX); every rank gets the total.

        Call on every rank of an initialised torch.distributed process group
        (gloo for CPU state, nccl for CUDA state). Returns `self`.
        """
        import torch.distributed as dist

        for t in (self.n, self.s1, self.s2, self.p, self.h_sum, *self._zero_stats()):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self.min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX, group=group)
        return self

    def reduce(self, dst: int = 0, group: object = None) -> MonoScoreAccumulator:
        """Like `all_reduce` but only rank `dst` receives the total (other ranks' state is then unspecified)."""
        import torch.distributed as dist

        for t in (self.n, self.s1, self.s2, self.p, self.h_sum, *self._zero_stats()):
            dist.reduce(t, dst, op=dist.ReduceOp.SUM, group=group)
        dist.reduce(self.min, dst, op=dist.ReduceOp.MIN, group=group)
        dist.reduce(self.max, dst, op=dist.ReduceOp.MAX, group=group)
        return self

    def _zero_stats(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.zero_n, self.zero_s1, self.zero_s2

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain tensors (references, like `nn.Module.state_dict`)."""
        return {k: getattr(self, k) for k in self._KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> MonoScoreAccumulator:
        """Replace the state with `state` (as returned by `state_dict`). Returns `self`."""
        load_tensor_state(self, state, self._KEYS)
        return self

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], *, device: torch.device | str | None = None
    ) -> MonoScoreAccumulator:
        """A new accumulator holding `state` (dim and n_latents read from `p`)."""
        if "p" not in state or torch.as_tensor(state["p"]).dim() != 2:
            raise InputError("from_state_dict: state has no 2-D 'p' entry")
        m, d = torch.as_tensor(state["p"]).shape
        return cls(int(d), int(m), device=device).load_state_dict(state)

    # ----------------------------------------------------------------- result
    def result(self) -> MonoScoreResult:
        """Exact MonoScore of everything added so far, with the active mask."""
        if int(self.n) < 1:
            raise InputError("MonoScoreAccumulator: no samples added; call update() first")
        n = float(self.n)
        mn, mx = self.min, self.max
        r = mx - mn
        spread = r > 0
        rs = torch.where(spread, r, torch.ones_like(r))
        u = (self.s1 - n * mn) / rs
        v = (self.s2 - mn * (2.0 * self.s1 - n * mn)) / (rs * rs)
        # q_k = ||P_k - min_k Hsum||² / r_k², in latent blocks through one small buffer
        q = torch.empty_like(u)
        step = max(1, _CONVERT_ELEMS // self.dim)
        buf = torch.empty(min(step, self.n_latents), self.dim, dtype=_F64, device=self.device)
        for k in range(0, self.n_latents, step):
            w = buf[: min(step, self.n_latents - k)]
            torch.addr(self.p[k : k + step], mn[k : k + step], self.h_sum, alpha=-1.0, out=w)
            torch.linalg.vector_norm(w, dim=1, out=q[k : k + step])
        q.square_()
        q /= rs * rs
        num = 0.5 * (q - zero_rows_removed(v, self.zero_s1, self.zero_s2, self.zero_n, mn, rs))
        den = 0.5 * (u * u - v)
        scores, active = finish_scores(num, den, u, mn, rs, spread, n)
        return MonoScoreResult(scores, active, num, den)

    def compute(self) -> Tensor:
        """Exact MonoScore per latent ([n_latents], float64; 0 where undefined)."""
        return self.result().scores


def zero_rows_removed(
    v: Tensor, zs1: Tensor, zs2: Tensor, zn: Tensor | float, mn: Tensor, rs: Tensor
) -> Tensor:
    """`Σ_n ||h_n||² ã_n²`: `v = Σ ã²` less the share of the all-zero rows (raw sums
    `zs1`, `zs2` over `zn` rows); `v` itself, bit for bit, when there are none."""
    return v - (zs2 - mn * (2.0 * zs1 - zn * mn)) / (rs * rs)


# --------------------------------------------------------------- sparse helpers
def col_sum(col: Tensor, w: Tensor, n_cols: int) -> Tensor:
    """float64 `out[c] = Σ_{j: col_j = c} w_j` (bincount; float64 even for empty input)."""
    return torch.bincount(col, weights=w, minlength=n_cols).to(_F64)


def column_stats(
    col: Tensor, v: Tensor, n_rows: int, n_cols: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(S1, S2, min, max, counts)` per column of a sparse matrix given as (col, float64 value).

    Entries not stored are zeros: a column with fewer stored entries than rows
    has 0 folded into its min and max.
    """
    counts = torch.bincount(col, minlength=n_cols)
    s1 = col_sum(col, v, n_cols)
    s2 = col_sum(col, v * v, n_cols)
    mx = torch.full((n_cols,), -math.inf, dtype=_F64, device=v.device)
    mx = mx.scatter_reduce(0, col, v, "amax", include_self=True)
    mn = torch.full((n_cols,), math.inf, dtype=_F64, device=v.device)
    mn = mn.scatter_reduce(0, col, v, "amin", include_self=True)
    implicit = counts < n_rows
    mx = torch.where(implicit, mx.clamp(min=0.0), mx)
    mn = torch.where(implicit, mn.clamp(max=0.0), mn)
    return s1, s2, mn, mx, counts


def index_dtype(limit: int) -> torch.dtype:
    """int32 when every index/key stays below `limit` < 2**31 (faster sorts, MKL's native type)."""
    return torch.int32 if limit < 2**31 else torch.int64


def csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor from trusted parts (no invariant checks, no beta warning)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


# ------------------------------------------------------------------ functions
def _validated(embeddings: object, activations: object) -> tuple[Tensor, Tensor]:
    e = as_tensor(embeddings, "embeddings")
    check_2d_float(e, "embeddings")
    a = check_activations(activations)
    check_rows("embeddings", int(e.shape[0]), "activations", int(a.shape[0]))
    return e, a


def monoscore(embeddings: object, activations: object, *, chunk_rows: int = 4096) -> Tensor:
    """Exact MonoScore of every latent over the whole set (dataset min-max), one pass.

    embeddings [N, d], activations [N, M] (dense, or torch sparse COO/CSR: then
    O(nnz·d)). float64 accumulation; returns float64 [M], 0 where undefined.
    Equivalent to `MonoScoreAccumulator(d, M).update(E, A).compute()`.
    """
    e, a = _validated(embeddings, activations)
    acc = MonoScoreAccumulator(
        int(e.shape[1]), int(a.shape[1]), device=a.device, chunk_rows=chunk_rows
    )
    return acc.update(e, a).compute()


def monoscore_pairwise(embeddings: object, activations: object, *, block: int = 128) -> Tensor:
    """Reference MonoScore by the pairwise definition (paper Alg. 1), O(N²(d+M)), float64.

    Outer loop over anchor samples n; the partners m > n are processed in
    blocks of `block` rows: cosine similarities `h_m·h_n`, the element-wise
    products `ã_m ⊙ ã_n` of every pair, and their similarity-weighted and
    plain sums into the numerator and denominator (one small GEMM per block). The zero-denominator rule is the one
    shared with the linear paths. For tests and speed comparisons only.
    """
    e, a = _validated(embeddings, activations)
    with torch.no_grad():
        h = unit_rows(e)
        a = (a.detach().to_dense() if is_sparse(a) else a.detach()).to(_F64)
        check_finite_dense(a, "activations")
        n_rows, m = int(a.shape[0]), int(a.shape[1])
        mn, mx = a.amin(0), a.amax(0)
        r = mx - mn
        spread = r > 0
        rs = torch.where(spread, r, torch.ones_like(r))
        at = (a - mn) / rs  # exactly 0 on constant latents
        acc = torch.zeros(2, m, dtype=_F64, device=a.device)  # rows: numerator, denominator
        buf = torch.empty(min(block, n_rows), m, dtype=_F64, device=a.device)
        weights = torch.ones(2, min(block, n_rows), dtype=_F64, device=a.device)
        for i in range(n_rows - 1):
            hi, ai = h[i], at[i]
            for j in range(i + 1, n_rows, block):
                k = min(j + block, n_rows)
                prod = torch.mul(at[j:k], ai, out=buf[: k - j])  # ã_m ⊙ ã_n, one row per pair
                w = weights[:, : k - j]
                torch.mv(h[j:k], hi, out=w[0])  # s_nm = h_m·h_n
                acc.addmm_(w, prod)  # [Σ_m s_nm ã_m ã_n ; Σ_m ã_m ã_n] in one pass over prod
        num, den = acc[0], acc[1]
        scores, _ = finish_scores(num, den, at.sum(0), mn, rs, spread, float(n_rows))
    return scores


# ------------------------------------------------------------------ summaries
@dataclass(frozen=True, slots=True)
class MonoScoreSummary:
    """Scalar summaries of per-latent MonoScores.

    `mean_all`: mean over all latents, undefined/dead ones counting 0 (the
    paper's convention); `mean_active`: mean over active latents; `median`:
    median over all latents; `median_active`: over active ones (medians of an
    even count average the two middle values; 0.0 when there are no active
    latents, like the means).
    """

    mean_all: float
    mean_active: float
    median: float
    median_active: float
    n_active: int
    n_latents: int

    def as_dict(self) -> dict[str, float]:
        return {
            "monoscore_mean": self.mean_all,
            "monoscore_mean_active": self.mean_active,
            "monoscore_median": self.median,
            "monoscore_median_active": self.median_active,
            "monoscore_active_fraction": self.n_active / self.n_latents,
        }


def _median(x: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    s = torch.sort(x).values
    k = s.numel()
    return float(s[k // 2]) if k % 2 else float(0.5 * (s[k // 2 - 1] + s[k // 2]))


def monoscore_summary(scores: Tensor, active: Tensor | None = None) -> MonoScoreSummary:
    """Summaries of `scores` [M]; `active` [M] bool defaults to `scores != 0`.

    Pass `MonoScoreAccumulator.result().active` to count a defined score of
    exactly 0 as active.
    """
    s = torch.as_tensor(scores).detach().to(_F64).reshape(-1)
    if s.numel() == 0:
        raise InputError("scores: empty")
    act = (s != 0) if active is None else torch.as_tensor(active).to(torch.bool).reshape(-1)
    if act.numel() != s.numel():
        raise InputError(f"active has {act.numel()} entries but scores has {s.numel()}")
    sa = s[act]
    return MonoScoreSummary(
        mean_all=float(s.mean()),
        mean_active=float(sa.mean()) if sa.numel() else 0.0,
        median=_median(s),
        median_active=_median(sa),
        n_active=int(act.sum()),
        n_latents=int(s.numel()),
    )


def monoscore_profile(scores: Tensor, points: int | None = None) -> tuple[Tensor, Tensor]:
    """Sorted profile (paper Fig. 26-28): `(x, y)` with y = scores sorted descending.

    x is the normalised latent rank in [0, 1] (`i / (M - 1)`, 0 for M = 1).
    With `points`, returns that many evenly spaced ranks (for plots/logging).
    """
    s = torch.as_tensor(scores).detach().to(_F64).reshape(-1)
    if s.numel() == 0:
        raise InputError("scores: empty")
    y = torch.sort(s, descending=True).values
    m = y.numel()
    idx = torch.arange(m)
    if points is not None:
        if int(points) < 1:
            raise InputError(f"points: must be >= 1, got {points}")
        idx = torch.linspace(0, m - 1, int(points)).round().long()
    x = idx.to(_F64) / max(m - 1, 1)
    return x, y[idx]
