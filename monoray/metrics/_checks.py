"""Input validation shared by the metrics: one-line `InputError`s naming the argument.

Every public metric validates its inputs before it touches any state, so a bad
batch never leaves an accumulator half-updated. Checks are O(size of the input)
and cheap next to the metrics themselves; the dense activation check is fused
into the statistics pass (see `first_bad_row`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from monoray.errors import InputError

_SPARSE_LAYOUTS = (
    torch.sparse_coo,
    torch.sparse_csr,
    torch.sparse_csc,
    torch.sparse_bsr,
    torch.sparse_bsc,
)


def as_tensor(x: object, name: str) -> Tensor:
    """Return `x` as a torch tensor (numpy arrays are wrapped without a copy when possible)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only memmaps: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(x)
    raise InputError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def is_sparse(x: Tensor) -> bool:
    """True for any torch sparse layout (COO, CSR, CSC, BSR, BSC)."""
    return x.layout in _SPARSE_LAYOUTS


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def check_2d_float(x: Tensor, name: str) -> None:
    """2-D, floating point, at least one row and one column (dense or sparse)."""
    if x.dim() != 2:
        raise InputError(f"{name}: expected a 2-D tensor, got shape {_shape(x)}")
    if is_sparse(x) and x.dense_dim() != 0:
        raise InputError(f"{name}: sparse tensors must have scalar values (dense_dim 0)")
    if not x.dtype.is_floating_point:
        raise InputError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    if x.shape[0] < 1:
        raise InputError(f"{name}: empty (0 rows)")
    if x.shape[1] < 1:
        raise InputError(f"{name}: empty (0 columns)")


def first_bad_row(x: Tensor) -> int:
    """Index of the first row of a dense 2-D tensor holding NaN or inf (-1 if none)."""
    bad = ~torch.isfinite(x).all(dim=1)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else -1


def raise_nonfinite(x: Tensor, name: str, row_offset: int = 0) -> None:
    """Raise the one-line error for a dense tensor known to hold a non-finite value."""
    row = first_bad_row(x)
    vals = x[row]
    what = "NaN" if torch.isnan(vals).any() else "inf"
    raise InputError(f"{name}: contains {what} at row {row + row_offset}")


def check_finite_dense(x: Tensor, name: str) -> None:
    """Raise if a dense tensor holds NaN or inf, naming the first bad row."""
    if not bool(torch.isfinite(x).all()):
        raise_nonfinite(x, name)


def check_rows(a_name: str, a_rows: int, b_name: str, b_rows: int) -> None:
    """Both arguments must describe the same samples."""
    if a_rows != b_rows:
        raise InputError(f"{a_name} has {a_rows} rows but {b_name} has {b_rows}")


def check_cols(name: str, cols: int, expected: int, what: str) -> None:
    """A fixed width, e.g. an accumulator's `dim` or `n_latents`."""
    if cols != expected:
        raise InputError(f"{name} has {cols} columns but {what}={expected}")


def inv_row_norms(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    """float64 `1 / ||E_n||` per row [N, 1], 0 for an all-zero row; raises on non-finite values.

    An all-zero row (flat patch, padding) gets `h_n = 0`: similarity 0 with
    every sample, as the reference's epsilon-normalisation gives. The row
    norms double as the finiteness check: a row's norm is finite iff all its
    entries are (barring overflow beyond 1e154, reported as such).
    """
    e = embeddings.detach()
    norms = torch.linalg.vector_norm(e, dim=1, keepdim=True, dtype=torch.float64)
    ok = torch.isfinite(norms)
    if not bool(ok.all()):
        row = int(torch.nonzero(~ok.squeeze(1))[0, 0])
        if not bool(torch.isfinite(e[row]).all()):
            what = "NaN" if bool(torch.isnan(e[row]).any()) else "inf"
            raise InputError(f"{name}: contains {what} at row {row}")
        raise InputError(f"{name}: row {row} overflows float64 when squared")
    return (1.0 / norms).masked_fill_(norms == 0, 0.0)


def unit_rows(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    """float64 `h_n = E_n / ||E_n||`, 0 for an all-zero row (validated as in `inv_row_norms`)."""
    return unit_rows_and_zeros(embeddings, name)[0]


def unit_rows_and_zeros(embeddings: Tensor, name: str = "embeddings") -> tuple[Tensor, Tensor]:
    """`(h, zero)`: `unit_rows` and its `zero_row_weights` [N] (no extra pass over `h`)."""
    e = embeddings.detach()
    h = e.to(torch.float64)  # float64 input: a view, so not modified in place below
    inv = inv_row_norms(h, name)
    h = h * inv if e.dtype == torch.float64 else h.mul_(inv)  # cast once, normalise in place
    return h, zero_row_weights(inv)


def zero_row_weights(inv: Tensor) -> Tensor:
    """[N] float64: 1 for the all-zero rows (`inv_row_norms` 0), else 0.

    The linear forms use `||h_n||² = 1` for the self-pair term `Σ ã²` of the
    numerator; a zero row has `||h_n||² = 0`, so its share (`Σ_zero ã²`, built
    with these weights) is taken out again. All weights 0 leave every result
    bit-identical.
    """
    return (inv.reshape(-1) == 0).to(torch.float64)


@dataclass(frozen=True, slots=True)
class Triplets:
    """A sparse [n_rows, n_cols] matrix as (row, col, val) entries; unlisted entries are 0.

    `row` is non-decreasing (row-major order). (row, col) pairs are unique
    unless `unique` is False (an uncoalesced COO taken as is: duplicates, if
    any, must be summed; see `coalesced`). `val` keeps the input dtype and,
    for unique triplets, the autograd link.
    """

    row: Tensor
    col: Tensor
    val: Tensor
    n_rows: int
    n_cols: int
    unique: bool = True
    source: Tensor | None = None  # the uncoalesced COO, when unique is False

    def coalesced(self) -> Triplets:
        """Unique triplets (coalescing the source COO if needed)."""
        if self.unique or self.source is None:
            return self
        c = self.source.coalesce()
        idx = c.indices()
        return Triplets(
            idx[0].contiguous(), idx[1].contiguous(), c.values(), self.n_rows, self.n_cols
        )

    @property
    def nnz(self) -> int:
        return int(self.val.numel())


def _check_index_range(idx: Tensor, limit: int, name: str, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        raise InputError(f"{name}: {what} index out of range [0, {limit})")


def to_triplets(
    x: Tensor, name: str = "activations", *, allow_duplicates: bool = False
) -> Triplets:
    """Unique, row-sorted triplets of a validated 2-D sparse tensor (COO, CSR or other).

    COO is coalesced (duplicates summed) if needed, except with
    `allow_duplicates` when its rows are already in order (no autograd link
    then; the caller must detect duplicates, see `Triplets.coalesced`); CSR is
    used as is when its entries are unique and row-major sorted (the usual
    case), else it is coalesced through COO. Values keep their autograd link (`values()` of a
    coalesced COO or a CSR tensor is differentiable in torch 2.15).
    """
    n_rows, n_cols = int(x.shape[0]), int(x.shape[1])
    if x.layout == torch.sparse_csr:
        crow, col, val = x.crow_indices(), x.col_indices(), x.values()
        if crow.numel() != n_rows + 1 or int(crow[0]) != 0 or int(crow[-1]) != val.numel():
            raise InputError(f"{name}: malformed CSR row offsets")
        counts = crow.diff()
        if counts.numel() and int(counts.min()) < 0:
            raise InputError(f"{name}: CSR row offsets must be non-decreasing")
        _check_index_range(col, n_cols, name, "column")
        col = col.to(torch.int64)
        row = torch.repeat_interleave(
            torch.arange(n_rows, device=col.device), counts.to(torch.int64), output_size=col.numel()
        )
        key = row * n_cols + col
        if key.numel() < 2 or bool((key[1:] > key[:-1]).all()):
            return Triplets(row, col, val, n_rows, n_cols)
        x = x.to_sparse_coo()
    elif x.layout != torch.sparse_coo:
        x = x.to_sparse_coo()
    raw = x._indices()
    _check_index_range(raw[0], n_rows, name, "row")
    _check_index_range(raw[1], n_cols, name, "column")
    if not x.is_coalesced():
        r = raw[0]
        if allow_duplicates and (r.numel() < 2 or bool((r[1:] >= r[:-1]).all())):
            # Rows already in order (what TopK code builds): skip the global sort;
            # the caller detects duplicates in its per-chunk sort and coalesces then.
            row, col = r.contiguous(), raw[1].contiguous()
            return Triplets(row, col, x._values(), n_rows, n_cols, unique=False, source=x)
        x = x.coalesce()
    idx, val = x.indices(), x.values()
    return Triplets(idx[0].contiguous(), idx[1].contiguous(), val, n_rows, n_cols)


def check_finite_values(t: Triplets, name: str) -> None:
    """Raise if stored sparse values hold NaN or inf, naming the row."""
    ok = torch.isfinite(t.val)
    if not bool(ok.all()):
        j = int(torch.nonzero(~ok)[0, 0])
        what = "NaN" if bool(torch.isnan(t.val[j])) else "inf"
        raise InputError(f"{name}: contains {what} at row {int(t.row[j])}")


def check_activations(x: object, name: str = "activations") -> Tensor:
    """Validate shape and dtype of dense or sparse activations; returns a tensor.

    Finiteness of dense activations is checked by the caller inside its
    statistics pass (a separate pass would cost as much as the statistics).
    """
    t = as_tensor(x, name)
    check_2d_float(t, name)
    return t


def check_labels(
    labels: object, n_rows: int, n_classes: int | None, name: str = "labels"
) -> Tensor:
    """1-D integer labels, one per row, in [0, n_classes)."""
    y = as_tensor(labels, name)
    if y.dim() != 1:
        raise InputError(f"{name}: expected a 1-D tensor, got shape {_shape(y)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise InputError(f"{name}: expected an integer dtype, got {y.dtype}")
    if y.numel() != n_rows:
        raise InputError(f"activations has {n_rows} rows but {name} has {y.numel()}")
    y = y.to(torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"{name}: negative label {int(y.min())}")
    if n_classes is not None and y.numel() and int(y.max()) >= n_classes:
        raise InputError(f"{name}: label {int(y.max())} >= n_classes={n_classes}")
    return y


def load_tensor_state(owner: object, state: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    """Copy `state[k]` into the tensor attribute `owner.k` for every key (accumulator state).

    The key set and every shape must match exactly; dtype and device follow `owner`.
    """
    if set(state) != set(keys):
        raise InputError(f"load_state_dict: expected keys {sorted(keys)}, got {sorted(state)}")
    for k in keys:
        new = torch.as_tensor(state[k])
        cur = getattr(owner, k)
        if tuple(new.shape) != tuple(cur.shape):
            raise InputError(
                f"load_state_dict: {k} has shape {tuple(new.shape)}, expected {tuple(cur.shape)}"
            )
        cur.copy_(new.to(device=cur.device, dtype=cur.dtype))
