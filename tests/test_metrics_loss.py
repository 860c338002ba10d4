"""MonoLoss: value and gradient equal autograd through a dense pairwise batch loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics_common import as_layout, cases, pairwise_loss

from monoray.errors import InputError
from monoray.metrics import DEFAULT_EPS, mono_loss, mono_loss_rows, stacked_mono_loss


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    atol = 1e-12 * max(1.0, float(ref.abs().max())) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=atol)


def _reference(e: torch.Tensor, a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = a.clone().requires_grad_()
    loss = pairwise_loss(e, x, eps)
    loss.backward()
    return loss.detach(), x.grad


def _rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR-like arrays of the non-zeros with columns shuffled inside each row."""
    idx = torch.nonzero(a)
    key = idx[:, 0].to(torch.float64) + torch.rand(idx.shape[0], dtype=torch.float64) * 0.5
    idx = idx[torch.argsort(key)]
    offsets = torch.zeros(a.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(idx[:, 0], minlength=a.shape[0]).cumsum(0)
    return idx, idx[:, 1].clone(), offsets


eps_values = st.sampled_from([DEFAULT_EPS, 0.0, 0.3])


@given(cases(max_n=14, zero_rows=True), eps_values)
def test_dense_value_and_gradient_equal_pairwise_autograd(case, eps) -> None:
    ref, ref_grad = _reference(case.embeddings, case.activations, eps)
    x = case.activations.clone().requires_grad_()
    loss = mono_loss(case.embeddings, x, eps=eps)
    loss.backward()
    _close(loss.detach(), ref)
    _close(x.grad, ref_grad)


@given(cases(max_n=14, zero_rows=True), eps_values, st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_stacked_losses_equal_pairwise_autograd_of_each_matrix(case, eps, p, seed) -> None:
    """P activation matrices of one batch (the case's, then the same columns permuted and
    scaled): each loss and its gradient as the pairwise reference's, at once."""
    g = torch.Generator().manual_seed(seed)
    mats = [case.activations]
    for _ in range(p - 1):
        perm = torch.randperm(case.activations.shape[1], generator=g)
        mats.append(
            case.activations[:, perm] * (0.5 + torch.rand(1, generator=g, dtype=torch.float64))
        )
    x = torch.stack(mats).requires_grad_()
    losses = stacked_mono_loss(case.embeddings, x, eps=eps)
    losses.sum().backward()
    for i, a in enumerate(mats):
        ref, ref_grad = _reference(case.embeddings, a, eps)
        _close(losses[i].detach(), ref)
        _close(x.grad[i], ref_grad)


@given(cases(max_n=14, zero_rows=True), eps_values, st.sampled_from(["coo", "csr", "rows"]))
def test_sparse_value_and_gradient_equal_pairwise_autograd(case, eps, layout) -> None:
    a = case.activations
    ref, ref_grad = _reference(case.embeddings, a, eps)
    if layout == "rows":
        idx, cols, offsets = _rows(a)
        vals = a[idx[:, 0], idx[:, 1]].clone().requires_grad_()
        loss = mono_loss_rows(case.embeddings, vals, cols, offsets, a.shape[1], eps=eps)
    else:
        sp = as_layout(a, layout)
        idx = torch.nonzero(a)  # row-major, the order of the stored values below
        vals = a[idx[:, 0], idx[:, 1]].clone().requires_grad_()
        if layout == "coo":
            sp = torch.sparse_coo_tensor(idx.T, vals, a.shape)
        else:
            sp = torch.sparse_csr_tensor(sp.crow_indices(), sp.col_indices(), vals, a.shape)
        loss = mono_loss(case.embeddings, sp, eps=eps)
    _close(loss.detach(), ref)
    if vals.numel():
        loss.backward()
        _close(vals.grad, ref_grad[idx[:, 0], idx[:, 1]])


def _float32_error_bound(a: torch.Tensor, eps: float) -> float:
    """First-order bound on the float32 products' error in one latent's batch score.

    The products use raw activations: P_k = Σ a h carries a relative error of
    ~n·2⁻²⁴, so the normalised `||P̃_k||²` is off by about `n·2⁻²⁴·scale_k²` with
    `scale_k = Σ ã + n·|min_k|/range_k` (the raw-statistics correction's size,
    as in `finish_scores`), and the score `num/den` by that over `den_k`.
    """
    lo, hi = a.amin(0), a.amax(0)
    r = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    at = (a - lo) / r
    u, v = at.sum(0), (at * at).sum(0)
    den = 0.5 * (u * u - v)
    active = (hi > lo) & (den > max(eps, 1e-12))
    if not bool(active.any()):
        return 1e-12
    scale = u + a.shape[0] * lo.abs() / r
    ratio = (scale * scale + 1.0)[active] / den[active]
    return 4.0 * a.shape[0] * 2.0**-24 * float(ratio.max()) + 1e-12


@given(cases(max_n=14), eps_values, st.sampled_from(["dense", "csr", "rows"]))
def test_float32_products_stay_within_their_rounding_bound(case, eps, layout) -> None:
    e, a = case.embeddings, case.activations
    idx, cols, offsets = _rows(a)  # one shuffle for both precisions
    got = {}
    for precision in ("float64", "float32"):
        vals = a[idx[:, 0], idx[:, 1]].clone().requires_grad_()
        if layout == "rows":
            m = a.shape[1]
            loss = mono_loss_rows(e, vals, cols, offsets, m, eps=eps, precision=precision)
        elif layout == "csr":
            idx = torch.nonzero(a)  # row-major: the CSR order of the values
            vals = a[idx[:, 0], idx[:, 1]].clone().requires_grad_()
            sp = a.to_sparse_csr()
            sp = torch.sparse_csr_tensor(sp.crow_indices(), sp.col_indices(), vals, a.shape)
            loss = mono_loss(e, sp, eps=eps, precision=precision)
        else:
            vals = a.clone().requires_grad_()
            loss = mono_loss(e, vals, eps=eps, precision=precision)
        loss.backward()
        got[precision] = (loss.detach(), vals.grad)
    bound = _float32_error_bound(a, eps)
    (l64, g64), (l32, g32) = got["float64"], got["float32"]
    assert abs(float(l32 - l64)) <= bound
    if g64.numel():
        scale = max(1.0, float(g64.abs().max()))
        assert float((g32 - g64).abs().max()) <= bound * scale


def test_precision_is_validated() -> None:
    e, a = torch.eye(3), torch.rand(3, 4)
    with pytest.raises(InputError, match="precision"):
        mono_loss(e, a, precision="float16")  # type: ignore[arg-type]


def test_hand_value() -> None:
    # h1=(1,0), h2=(0,1), h3=(1,1)/√2; latent 0: ã=(1,0,1) -> MS = s13 = 1/√2;
    # latent 1: ã=(0, 1/2, 1) -> MS = s23 = 1/√2; latent 2 constant: inactive.
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    a = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [2.0, 2.0, 1.0]])
    assert mono_loss(e, a).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert mono_loss(e, a.to_sparse()).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize(
    "a",
    [
        torch.full((5, 4), 2.5),  # constant latents
        torch.zeros(5, 4),  # all-zero latents
        torch.rand(1, 4) + 0.5,  # a batch of one
        torch.tensor([[0.0, 1.0], [0.0, 0.0], [3.0, 0.0]]),  # each fires on one sample
    ],
)
def test_nothing_active_gives_one_with_zero_finite_gradient(a, layout) -> None:
    e = torch.randn(a.shape[0], 3)
    if layout == "dense":
        x = a.clone().requires_grad_()
        loss, leaf = mono_loss(e, x), x
    else:
        idx = torch.nonzero(a)
        leaf = a[idx[:, 0], idx[:, 1]].clone().requires_grad_()
        sp = torch.sparse_coo_tensor(idx.T, leaf, a.shape)
        loss = mono_loss(e, sp if layout == "coo" else sp.to_sparse_csr())
    assert loss.item() == 1.0 and loss.dtype == torch.float32
    if leaf.numel():
        loss.backward()
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_embeddings_get_no_gradient_and_dtype_follows_activations() -> None:
    e = torch.randn(8, 3, requires_grad=True)
    a = torch.rand(8, 5, dtype=torch.float64, requires_grad=True)
    loss = mono_loss(e, a)
    assert loss.dtype == torch.float64
    loss.backward()
    assert e.grad is None and a.grad is not None and torch.isfinite(a.grad).all()


def test_topk_recipe_from_docstring() -> None:
    g = torch.Generator().manual_seed(3)
    b, m, k = 16, 12, 3
    x = torch.randn(b, 6, generator=g)
    z = torch.randn(b, m, generator=g, requires_grad=True)
    vals, idx = z.topk(k, dim=1)
    loss = mono_loss_rows(
        x, vals.relu().reshape(-1), idx.reshape(-1), torch.arange(0, b * k + 1, k), m
    )
    dense = torch.zeros(b, m).scatter(1, idx, vals.relu())
    ref = mono_loss(x, dense)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()


@settings(max_examples=10)
@given(cases(min_n=2, max_n=10, zero_rows=True))
def test_loss_is_never_nan(case) -> None:
    x = case.activations.clone().requires_grad_()
    loss = mono_loss(case.embeddings, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bad_inputs() -> None:
    e = torch.randn(3, 2)
    vals = torch.ones(3)
    with pytest.raises(InputError, match="embeddings has 3 rows but activations has 2"):
        mono_loss(e, torch.rand(2, 4))
    with pytest.raises(InputError, match="activations: contains NaN at row 1"):
        mono_loss(e, torch.tensor([[0.0], [math.nan], [1.0]]))
    with pytest.raises(InputError, match="activations: contains inf at row 2"):
        mono_loss(e, torch.tensor([[0.0], [1.0], [math.inf]]).to_sparse())
    with pytest.raises(InputError, match="eps"):
        mono_loss(e, torch.rand(3, 4), eps=-1.0)
    offsets = torch.tensor([0, 1, 2, 3])
    with pytest.raises(InputError, match="duplicate entry at row 1, column 0"):
        mono_loss_rows(e, torch.ones(4), torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 3, 4]), 2)
    with pytest.raises(InputError, match="col_indices: index out of range"):
        mono_loss_rows(e, vals, torch.tensor([0, 5, 1]), offsets, 2)
    with pytest.raises(InputError, match="row_offsets"):
        mono_loss_rows(e, vals, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 1, 3]), 2)
    with pytest.raises(InputError, match="embeddings has 3 rows but row_offsets"):
        mono_loss_rows(e, vals, torch.tensor([0, 1, 1]), torch.tensor([0, 3]), 2)
    with pytest.raises(InputError, match="values: contains NaN at row 2"):
        mono_loss_rows(e, torch.tensor([1.0, 2.0, math.nan]), torch.tensor([0, 1, 1]), offsets, 2)
