"""Exactness of the SAE architectures: sparse == dense, hand formulas, state handling."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from monoray.sae import (
    ARCH_NAMES,
    TOPK_FAMILY,
    SAEConfig,
    SparseAutoencoder,
    SparseLatents,
    build_sae,
)
from monoray.sae.jumprelu import jumprelu, step
from monoray.sae.sparse import batch_topk

D_IN, D_SAE, K, B = 12, 48, 5, 40


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: a second OpenMP thread only adds sync cost (and stalls when the box is busy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    msg: str = "",
) -> None:
    # not torch.testing.assert_close: its first call costs ~15 s of imports on a 2-core box
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"{msg} max abs diff {(actual - expected).abs().max().item():.3g}"
    )


def make(
    arch: str, impl: str = "sparse", *, double: bool = True, **kw: object
) -> SparseAutoencoder:
    if double:  # exactness checks: MonoLoss products in float64 too (the default is float32)
        kw.setdefault("mono_precision", "float64")
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, impl=impl, seed=3, **kw)  # type: ignore[arg-type]
    sae = build_sae(cfg)
    if arch == "jumprelu":  # thresholds spread over the pre-activations' range
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            sae.log_threshold.copy_((torch.rand(D_SAE, generator=gen) * 0.3 + 0.05).log())
    return sae.double() if double else sae


def batch(
    n: int = B, seed: int = 5, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True), torch.randn(n, 7, generator=gen, dtype=dtype)


def train_step(sae: SparseAutoencoder, x: torch.Tensor, emb: torch.Tensor | None = None):
    sae.zero_grad()
    out = sae.forward_train(x, emb)
    out.loss.loss.backward()
    return out


def assert_same_step(
    a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor, emb: torch.Tensor
):
    oa, ob = train_step(a, x, emb), train_step(b, x, emb)
    ma, mb = oa.loss.metrics(), ob.loss.metrics()
    assert ma.keys() == mb.keys()
    for key in ma:
        assert_close(ma[key], mb[key], rtol=1e-10, atol=1e-12, msg=key)
    assert_close(oa.recon, ob.recon, rtol=1e-10, atol=1e-12)
    assert_close(oa.latents.to_dense(), ob.latents.to_dense(), rtol=1e-10, atol=1e-12)
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert_close(p.grad, grads_b[name].grad, rtol=1e-9, atol=1e-12, msg=name)
    buffers_b = dict(b.named_buffers())
    for name, buf in a.named_buffers():
        assert torch.equal(buf, buffers_b[name]), name
    return oa, ob


@pytest.mark.parametrize("mono", [0.0, 0.5])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sparse_matches_dense(arch: str, mono: float) -> None:
    extra = {"jumprelu_bandwidth": 0.05} if arch == "jumprelu" else {}
    a, b = (
        make(arch, "sparse", mono_coef=mono, **extra),
        make(arch, "dense", mono_coef=mono, **extra),
    )
    x, emb = batch()
    oa, ob = assert_same_step(a, b, x, emb)
    assert (oa.path, ob.path) == ("sparse", "dense")
    assert (oa.loss.mono is None) == (mono == 0)
    if arch == "jumprelu":  # the kernel window was hit: the threshold gradient is tested
        assert a.log_threshold.grad.abs().sum() > 0
    assert_same_step(a, b, *batch(seed=6))  # a second step, buffers updated by the first


@pytest.mark.parametrize("arch", TOPK_FAMILY)
def test_sparse_matches_dense_with_dead_latents(arch: str) -> None:
    a, b = make(arch, "sparse", mono_coef=0.3), make(arch, "dense", mono_coef=0.3)
    for sae in (a, b):
        sae.steps_since_fired[::3] = 10**6
    oa, _ = assert_same_step(a, b, *batch())
    assert oa.loss.aux > 0


@pytest.mark.parametrize("arch", ["jumprelu", "vanilla"])
def test_auto_dense_batch_matches_plain_dense(arch: str) -> None:
    # at init about half of the latents fire: auto reuses the no-grad GEMM, dense backward
    a, b = make(arch, "auto", mono_coef=0.2), make(arch, "dense", mono_coef=0.2)
    if arch == "jumprelu":
        for sae in (a, b):
            sae.log_threshold.data.fill_(-7.0)
    oa, _ = assert_same_step(a, b, *batch())
    assert oa.path == "dense"


def test_batch_topk_selection_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    for acts in (
        torch.randn(300, 50, generator=gen).relu(),  # sampled cut path
        torch.randint(0, 3, (64, 40), generator=gen).float(),  # ties and zeros: fallback
        torch.zeros(8, 10),
    ):
        n = 7 * acts.shape[0]
        values, pos = batch_topk(acts, n)
        assert pos.numel() == n and torch.equal(pos, pos.sort().values)
        assert torch.equal(acts.view(-1)[pos], values)
        ref = acts.view(-1).topk(n).values
        assert_close(values.sort().values, ref.sort().values)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_keeps_exactly_k_times_batch(arch: str) -> None:
    sae = make(arch)
    x, _ = batch()
    assert train_step(sae, x).latents.nnz == K * B
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # fewer than k * B positive pre-activations
    out = train_step(sae, x)
    assert out.latents.nnz == K * B
    assert out.loss.l0 < K


def test_decoder_gradient_projection_and_renorm() -> None:
    sae = make("topk", recon_loss="mse")  # gradients of the scale the atol below assumes
    train_step(sae, *batch())
    grad = sae.W_dec.grad.clone()
    w = sae.W_dec.detach()
    sae.before_optimizer_step()
    projected = sae.W_dec.grad
    assert_close((projected * w).sum(1), torch.zeros(D_SAE, dtype=w.dtype), atol=1e-15, rtol=0)
    parallel = ((grad * w).sum(1, keepdim=True)) * w  # rows are unit norm
    assert_close(projected, grad - parallel)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE, dtype=w.dtype)[:, None])
    direction = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    sae.after_optimizer_step()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=w.dtype))
    assert_close(sae.W_dec.detach(), direction)


@pytest.mark.parametrize("recon_loss", ["mse", "normalized_mse"])
def test_auxk_matches_hand_formula(recon_loss: str) -> None:
    sae = make("topk", aux_k=3, recon_loss=recon_loss)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    sae.steps_since_fired[dead] = sae.cfg.dead_steps_threshold
    x, _ = batch()
    out = train_step(sae, x)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        vals, idx = pre.masked_fill(~dead, -torch.inf).topk(3, dim=1)
        acts = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        residual = x - out.recon
        err = ((acts @ sae.W_dec) - residual).pow(2).mean(dim=1)
        if recon_loss == "normalized_mse":  # AuxK uses its architecture's normalisation
            err = err / residual.pow(2).mean(dim=1)
        expected = err.mean()
    assert_close(out.loss.aux, expected)
    assert_close(out.loss.loss, out.loss.mse + out.loss.aux / 32)
    assert sae.W_dec.grad[dead].abs().sum() > 0  # dead latents learn from the residual


def test_jumprelu_straight_through_gradient_matches_hand_formula() -> None:
    eps = 0.1
    z = torch.tensor([0.00, 0.30, 0.46, 0.54, 0.60, 0.80], dtype=torch.float64, requires_grad=True)
    log_theta = torch.full((6,), 0.5, dtype=torch.float64).log().requires_grad_()
    g = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5, 1.5], dtype=torch.float64)
    out = jumprelu(z, log_theta, eps)
    assert_close(out, z.detach() * (z.detach() > 0.5))
    (out * g).sum().backward()  # a scalar backward: a tensor one imports ~4 s of modules
    window = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.float64)  # |z - θ| < ε/2
    fires = (z.detach() > 0.5).double()
    assert_close(z.grad, g * fires)
    # d a/d θ = -(θ/ε) K, times dθ/dlogθ = θ
    assert_close(log_theta.grad, -(0.5 * 0.5 / eps) * window * g)
    z.grad = log_theta.grad = None
    (step(z, log_theta, eps) * g).sum().backward()
    assert z.grad is None
    assert_close(log_theta.grad, -(0.5 / eps) * window * g)


def test_matryoshka_loss_sums_prefix_errors() -> None:
    sae = make("matryoshka", matryoshka_prefixes=(6, 20, D_SAE))
    x, _ = batch()
    out = train_step(sae, x)
    dense = out.latents.to_dense().detach()
    expected = []
    for size in (6, 20, D_SAE):
        recon = dense[:, :size] @ sae.W_dec[:size].detach() + sae.b_dec.detach()
        expected.append((recon - x).pow(2).mean())
    assert_close(torch.stack(out.loss.prefix_mse), torch.stack(expected))
    assert_close(out.loss.mse, sum(expected))
    assert set(out.loss.metrics()) >= {"mse_prefix_6", "mse_prefix_20", f"mse_prefix_{D_SAE}"}


def test_mono_coef_zero_skips_monoloss(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("MonoLoss computed")

    fake = types.SimpleNamespace(mono_loss=boom, mono_loss_rows=boom)
    monkeypatch.setattr("monoray.sae.base.metrics", fake)
    x, emb = batch()
    for arch in ARCH_NAMES:
        for impl in ("sparse", "dense"):
            out = make(arch, impl).forward_train(x, emb)
            assert out.loss.mono is None and "mono" not in out.loss.metrics()
    with pytest.raises(AssertionError, match="MonoLoss computed"):
        make("topk", mono_coef=1e-3).forward_train(x, emb)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_evaluation_changes_no_state(arch: str) -> None:
    sae = make(arch, "auto", double=False)
    x, _ = batch(dtype=torch.float32)
    train_step(sae, x)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    latents = sae.encode(x)
    sae.decode(latents)
    sae.decode(latents.to_dense())
    sae(x)
    after = sae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_evaluation_is_batch_independent(arch: str) -> None:
    sae = make(arch, double=False)
    for seed in range(5):
        train_step(sae, batch(256, seed, torch.float32)[0])
    assert float(sae.threshold) > 0 and int(sae.threshold_updates) == 5
    x, _ = batch(256, 99, torch.float32)
    full = sae.encode(x).to_dense()
    singles = torch.cat([sae.encode(x[i : i + 1]).to_dense() for i in range(256)])
    # the same latents fire; values agree up to the GEMM's rounding (BLAS takes another
    # kernel for a single row, ~1 ulp apart)
    assert torch.equal(full > 0, singles > 0)
    assert_close(full, singles, rtol=1e-6, atol=1e-6)
    assert 0 < full.count_nonzero() < full.numel() / 2


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_state_dict_round_trip_resumes_exactly(arch: str, tmp_path) -> None:
    a = make(arch, "auto", double=False, mono_coef=0.1, dead_steps_threshold=1)
    for seed in range(2):
        train_step(a, batch(64, seed, torch.float32)[0])
        a.before_optimizer_step()
        with torch.no_grad():
            for p in a.parameters():
                p -= 0.1 * p.grad
        a.after_optimizer_step()
    save_file(a.state_dict(), tmp_path / "sae.safetensors")
    b = build_sae(a.cfg)
    b.load_state_dict(load_file(tmp_path / "sae.safetensors"))
    x, emb = batch(64, 7, torch.float32)
    oa, ob = train_step(a, x, emb), train_step(b, x, emb)
    assert torch.equal(oa.loss.loss, ob.loss.loss)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad), name
    for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
        assert torch.equal(ba, bb), name


def test_topk_reinitialises_long_dead_latents() -> None:
    sae = make("topk", dead_reinit_steps=5, dead_steps_threshold=2)
    dead = torch.arange(0, D_SAE, 6)
    sae.steps_since_fired[dead] = 100
    # Adam's state layout; a real Adam's constructor imports torch._dynamo (~10 s here)
    state = {
        p: {"exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}
        for p in sae.parameters()
    }
    opt = types.SimpleNamespace(state=state)
    x, _ = batch()
    out = train_step(sae, x)
    fired_now = torch.zeros(D_SAE, dtype=torch.bool)
    fired_now[out.latents.col_indices[out.latents.values > 0]] = True
    due = dead[~fired_now[dead]]
    residual = (x - out.recon).detach()
    worst = residual.norm(dim=1).argsort(descending=True)[: due.numel()]
    sae.after_optimizer_step(opt)
    expected = residual[worst] / residual[worst].norm(dim=1, keepdim=True)
    assert_close(sae.W_dec[due].detach(), expected)
    assert_close(sae.W_enc[due].detach(), expected)
    assert torch.all(sae.b_enc[due] == 0) and torch.all(sae.steps_since_fired[due] == 0)
    assert torch.all(opt.state[sae.W_dec]["exp_avg"][due] == 0)
    assert torch.all(opt.state[sae.W_dec]["exp_avg_sq"][due] == 0)
    alive = torch.ones(D_SAE, dtype=torch.bool)
    alive[due] = False
    assert torch.all(opt.state[sae.W_dec]["exp_avg"][alive] == 1)


def test_sparse_latents_helpers() -> None:
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 9, generator=gen).relu() * (torch.rand(6, 9, generator=gen) < 0.4)
    lat = SparseLatents.from_dense(dense)
    assert torch.equal(lat.to_dense(), dense)
    assert torch.equal(lat.to_csr().to_dense(), dense)
    assert torch.equal(lat.l0(), (dense > 0).sum(1).float())
    sae = make("vanilla", double=False)
    big = SparseLatents.from_dense(torch.zeros(3, D_SAE).index_fill_(1, torch.tensor([1, 7]), 0.5))
    assert_close(sae.decode(big), sae.decode(big.to_dense()))
