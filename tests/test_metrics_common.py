"""Shared hypothesis strategies and plain reference implementations for the metrics tests.

Imported by the other `test_metrics_*` modules (pytest puts tests/ on sys.path).
Activations are drawn on a grid (multiples of 1/4, |a| <= 8): exact in
float64, full of ties, and with denominators that are either exactly zero or
far above the zero tolerance, so comparisons at 1e-9 are meaningful.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from monoray.metrics import DEN_RTOL

warnings.filterwarnings("ignore", message=".*Sparse.*")

COLUMN_KINDS = ("random", "relu", "negative", "constant", "zero", "single", "two")


@dataclass
class Case:
    embeddings: torch.Tensor  # [N, d] float64
    activations: torch.Tensor  # [N, M] float64, dense
    kinds: tuple[str, ...]


def make_column(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """One activation column of the given kind, on the 1/4 grid."""
    ints = torch.randint(-16, 33, (n,), generator=g).to(torch.float64) / 4
    if kind == "random":
        return ints
    if kind == "relu":
        return ints.clamp(min=0)
    if kind == "negative":
        return -ints.abs() - 1.0
    if kind == "constant":
        return torch.full((n,), float(ints[0]), dtype=torch.float64)
    if kind == "zero":
        return torch.zeros(n, dtype=torch.float64)
    col = torch.zeros(n, dtype=torch.float64)
    pos = torch.randperm(n, generator=g)
    col[pos[0]] = float(ints[0].abs() + 1)  # fires on exactly one sample
    if kind == "two" and n > 1:
        col[pos[1]] = 0.25  # ... and weakly on a second one
    return col


@st.composite
def cases(
    draw, max_n: int = 20, max_m: int = 6, max_d: int = 5, min_n: int = 1, zero_rows: bool = False
) -> Case:
    """`zero_rows`: some embedding rows (any number, all included) are all zeros."""
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(1, max_m))
    d = draw(st.integers(1, max_d))
    kinds = tuple(draw(st.lists(st.sampled_from(COLUMN_KINDS), min_size=m, max_size=m)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    e[e.norm(dim=1) == 0] = 1.0
    if zero_rows:
        e[draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True))] = 0.0
    a = torch.stack([make_column(k, n, g) for k in kinds], dim=1)
    return Case(e, a, kinds)


def as_layout(a: torch.Tensor, layout: str) -> torch.Tensor:
    """The same activations as dense, COO (uncoalesced: shuffled, or rows in order) or CSR."""
    if layout == "dense":
        return a
    if layout == "coo":
        idx = torch.nonzero(a).T
        perm = torch.randperm(idx.shape[1])
        idx = idx[:, perm]
        return torch.sparse_coo_tensor(idx, a[idx[0], idx[1]], a.shape)
    if layout == "coo_rows":  # uncoalesced, rows in order, columns shuffled (TopK style)
        idx = torch.nonzero(a)
        key = idx[:, 0].to(torch.float64) + 0.5 * torch.rand(idx.shape[0], dtype=torch.float64)
        idx = idx[torch.argsort(key)].T
        return torch.sparse_coo_tensor(idx, a[idx[0], idx[1]], a.shape)
    if layout == "csr":
        return a.to_sparse_csr()
    raise ValueError(layout)


def pairwise_loss(e: torch.Tensor, a: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference batch MonoLoss: dense pairwise sums over n < m, differentiated by autograd."""
    norm = e.norm(dim=1, keepdim=True)
    h = e / torch.where(norm > 0, norm, 1.0)  # an all-zero row: h = 0
    mn, mx = torch.amin(a, 0), torch.amax(a, 0)
    r = mx - mn
    spread = r > 0
    rs = torch.where(spread, r, torch.ones_like(r))
    at = (a - mn) / rs
    s = h @ h.T
    upper = torch.triu(torch.ones_like(s), diagonal=1)
    num = (at * ((s * upper) @ at)).sum(0)  # Σ_{n<m} ã_n ã_m s_nm
    den = (at * (upper @ at)).sum(0)  # Σ_{n<m} ã_n ã_m
    scale = at.sum(0) + a.shape[0] * mn.abs() / rs
    active = spread & (den > DEN_RTOL * scale**2) & (den > eps)
    ms = torch.where(active, num / torch.where(active, den, torch.ones_like(den)), 0.0)
    return 1.0 - ms.sum() / active.sum().clamp(min=1)
