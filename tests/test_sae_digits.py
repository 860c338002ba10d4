"""Every architecture learns sklearn digits on CPU in seconds (a tiny stand-in for the trainer)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from monoray.metrics import monoscore
from monoray.sae import ARCH_NAMES, TOPK_FAMILY, SAEConfig, SparseAutoencoder, build_sae

D_SAE, K, BATCH, EPOCHS, LR = 128, 8, 128, 12, 3e-3


@pytest.fixture(autouse=True)
def one_thread():
    # tiny GEMMs: a second OpenMP thread only adds sync cost (and stalls when the box is busy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(load_digits().data, dtype=torch.float32)
    x = x / x.norm(dim=1, keepdim=True)  # the paper's unit-norm inputs
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], x[perm[1400:]]


class _Adam:
    """Adam as torch.optim has it (lr, betas 0.9/0.999, eps); torch.optim's first use
    imports torch._dynamo, ~10 s on the 2-core test box."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, eps: float = 6.25e-10) -> None:
        self.params, self.lr, self.eps, self.t = params, lr, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(0.9).add_(p.grad, alpha=0.1)
            v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
            denom = (v / (1 - 0.999**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - 0.9**self.t))


def train(cfg: SAEConfig, x: torch.Tensor) -> SparseAutoencoder:
    sae = build_sae(cfg)
    opt = _Adam(list(sae.parameters()), lr=LR)
    gen = torch.Generator().manual_seed(1)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            xb = x[perm[i : i + BATCH]]
            out = sae.forward_train(xb, xb)
            sae.zero_grad()
            out.loss.loss.backward()
            sae.before_optimizer_step()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sae.after_optimizer_step()
            assert torch.isfinite(out.loss.loss)
    return sae


def r2(x: torch.Tensor, recon: torch.Tensor) -> tuple[float, float]:
    """(per-dim R² averaged over dims, explained variance). Digits has pixels that are
    nearly always 0 (val SS_tot ~ 2e-4, 1% of the mean): a reconstruction jitter of
    1e-3 there gives R² of -10 and swamps the mean, so those dims are left out."""
    ss_res = ((x - recon) ** 2).sum(0)
    ss_tot = ((x - x.mean(0)) ** 2).sum(0)
    keep = ss_tot > 0.01 * ss_tot.mean()
    per_dim = (1 - ss_res[keep] / ss_tot[keep]).mean()
    return float(per_dim), float(1 - ss_res.sum() / ss_tot.sum())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_learns_digits(arch: str, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    train_x, val_x = digits
    sae = train(SAEConfig(arch=arch, d_in=64, d_sae=D_SAE, k=K), train_x)
    latents = sae.encode(val_x)
    r2_dims, explained = r2(val_x, sae.decode(latents))
    assert r2_dims > 0.5 and explained > 0.5, (r2_dims, explained)
    l0 = float(latents.l0().mean())
    if arch in TOPK_FAMILY:
        assert abs(l0 - K) <= 0.1 * K, l0
    else:
        assert 0 < l0 < D_SAE


def test_monoloss_raises_monoscore(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    train_x, val_x = digits
    scores = []
    for mono_coef in (0.0, 0.03):
        cfg = SAEConfig(arch="batchtopk", d_in=64, d_sae=D_SAE, k=K, mono_coef=mono_coef)
        sae = train(cfg, train_x)
        scores.append(float(monoscore(val_x, sae.encode(val_x).to_dense()).mean()))
    assert scores[1] > scores[0] + 0.03, scores
