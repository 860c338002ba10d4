"""R², explained variance, L0 and dead fraction: hand values, direct formulas, streaming."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_metrics_common import as_layout

from monoray.errors import InputError
from monoray.metrics import (
    ReconstructionAccumulator,
    dead_fraction,
    explained_variance,
    l0,
    r2_score,
)


def direct(x: torch.Tensor, xh: torch.Tensor) -> tuple[float, float]:
    ss_tot = ((x - x.mean(0)) ** 2).sum(0)
    ss_res = ((x - xh) ** 2).sum(0)
    sumsq = (x**2).sum(0)
    keep = ss_tot > 1e-12 * sumsq
    r2 = float((1 - ss_res[keep] / ss_tot[keep]).mean()) if keep.any() else math.nan
    ev = float(1 - ss_res.sum() / ss_tot.sum()) if ss_tot.sum() > 1e-12 * sumsq.sum() else math.nan
    return r2, ev


def test_hand_example() -> None:
    x = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0]])
    xh = torch.tensor([[0.0, 2.0, 5.0], [1.0, 3.0, 4.0]])
    # dim0: SS_tot 2, SS_res 1 -> 0.5; dim1: SS_tot 2, SS_res 1 -> 0.5; dim2 constant: skipped
    assert r2_score(x, xh) == pytest.approx(0.5)
    assert explained_variance(x, xh) == pytest.approx(1 - 3 / 4)
    z = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 0.0]])
    assert l0(z) == pytest.approx(2.0)
    assert dead_fraction(z) == pytest.approx(2 / 4)  # latents 0 and 3 never > 0
    assert l0(z.to_sparse()) == 2.0 and dead_fraction(z.to_sparse_csr()) == 0.5


@st.composite
def recon(draw):
    n = draw(st.integers(1, 30))
    d = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from([0.0, 3.0, 1e4]))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    if draw(st.booleans()):
        x[:, 0] = offset + 0.1  # a constant dim
    xh = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, xh


@given(recon(), st.data())
def test_streaming_equals_direct_formulas(case, data) -> None:
    x, xh = case
    r2, ev = direct(x, xh)
    if math.isnan(r2):
        assert math.isnan(r2_score(x, xh))
    else:
        assert r2_score(x, xh) == pytest.approx(r2, rel=1e-9, abs=1e-9)
    cuts = sorted(
        data.draw(st.lists(st.integers(1, max(x.shape[0] - 1, 1)), max_size=4, unique=True))
    )
    bounds = [0, *[c for c in cuts if c < x.shape[0]], x.shape[0]]
    parts = [
        ReconstructionAccumulator(x.shape[1]).update(x[lo:hi], xh[lo:hi])
        for lo, hi in itertools.pairwise(bounds)
    ]
    total = ReconstructionAccumulator(x.shape[1])
    for p in reversed(parts):
        total.merge(p)
    out = total.compute()
    one = ReconstructionAccumulator(x.shape[1]).update(x, xh).compute()
    for key in ("r2", "explained_variance", "fvu", "mse"):
        if math.isnan(one[key]):
            assert math.isnan(out[key])
        else:
            assert out[key] == pytest.approx(one[key], rel=1e-9, abs=1e-9)
    if math.isnan(ev):
        assert math.isnan(one["explained_variance"])
    else:
        assert one["explained_variance"] == pytest.approx(ev, rel=1e-9, abs=1e-9)


@given(
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["dense", "coo", "csr"]),
)
def test_l0_and_dead_fraction_streaming(n, m, seed, layout) -> None:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randint(-2, 3, (n, m), generator=g) * (torch.rand(n, m, generator=g) < 0.4)).to(
        torch.float64
    )
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    acc = ReconstructionAccumulator(3, m)
    half = n // 2
    acc.update(x[:half], x[:half], as_layout(z[:half], layout)) if half else None
    acc.update(x[half:], x[half:], as_layout(z[half:], layout))
    out = acc.compute()
    assert out["l0"] == pytest.approx(float((z != 0).sum()) / n)
    assert out["dead_fraction"] == pytest.approx(float((~(z > 0).any(0)).sum()) / m)
    assert l0(as_layout(z, layout)) == pytest.approx(out["l0"])


def test_constant_dim_is_skipped_not_infinite() -> None:
    x = torch.tensor([[0.1, 1.0], [0.1, 2.0], [0.1, 4.0]], dtype=torch.float64)
    xh = x + torch.tensor([[0.01, 0.5], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    acc = ReconstructionAccumulator(2).update(x, xh)
    per_dim = acc.r2_per_dim()
    assert math.isnan(per_dim[0]) and r2_score(x, xh) == pytest.approx(float(per_dim[1]))
    assert math.isnan(r2_score(x[:, :1], x[:, :1]))


def test_bad_inputs() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(InputError, match=r"x has shape \(4, 3\) but x_hat has shape \(4, 2\)"):
        r2_score(x, x[:, :2])
    bad = x.clone()
    bad[1, 1] = math.inf
    with pytest.raises(InputError, match="x_hat: contains inf at row 1"):
        explained_variance(x, bad)
    acc = ReconstructionAccumulator(3, 5)
    with pytest.raises(InputError, match="x has 4 rows but latents has 2"):
        acc.update(x, x, torch.rand(2, 5))
    with pytest.raises(InputError, match="latents has 4 columns but n_latents=5"):
        acc.update(x, x, torch.rand(4, 4))
    with pytest.raises(InputError, match="no samples"):
        acc.compute()
    with pytest.raises(InputError, match="created without n_latents"):
        ReconstructionAccumulator(3).update(x, x, torch.rand(4, 5))
