"""JumpReLU SAE (Rajamanoharan et al. 2024): a_j = z_j · H(z_j - θ_j) on z = ReLU(pre),
with learned per-latent thresholds θ = exp(log_threshold) and an L0 penalty.

H has no useful gradient, so θ learns through a straight-through estimator with
the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε (`jumprelu_bandwidth`):

    ∂a/∂z = H(z - θ)                 ∂a/∂θ ≈ -(θ/ε) K((z - θ)/ε)
    ∂H(z - θ)/∂z = 0                 ∂H(z - θ)/∂θ ≈ -(1/ε) K((z - θ)/ε)

and the chain rule through θ = exp(log θ) multiplies the θ-gradients by θ.

Initialisation: on unit-norm inputs the pre-activations have std ≈ d_in**-0.5
(unit encoder rows), so thresholds of the order of a standardised-input SAE
(θ ~ 1) would let no latent fire and, with an empty kernel window, never learn.
θ starts at `jumprelu_init_threshold` (1e-3): about half of the latents fire.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from monoray.sae.config import SAEConfig
from monoray.sae.elementwise import ElementwiseSAE
from monoray.sae.sparse import Pattern, SparseLatents


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, log_theta: Tensor, bandwidth: float) -> Tensor:
        theta = log_theta.exp()
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = g * (z > theta)
        window = (z - theta).abs() < eps / 2
        grad_log_theta = -(theta * theta / eps) * window * g
        return grad_z, grad_log_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, log_theta: Tensor, bandwidth: float) -> Tensor:
        theta = log_theta.exp()
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = (z - theta).abs() < eps / 2
        return None, -(theta / eps) * window * g, None


def jumprelu(z: Tensor, log_theta: Tensor, bandwidth: float) -> Tensor:
    """z · H(z - exp(log_theta)) with the straight-through θ-gradient (same shapes)."""
    return _JumpReLU.apply(z, log_theta, bandwidth)


def step(z: Tensor, log_theta: Tensor, bandwidth: float) -> Tensor:
    """H(z - exp(log_theta)) as 0/1 with the straight-through θ-gradient (same shapes)."""
    return _Step.apply(z, log_theta, bandwidth)


class JumpReLUSAE(ElementwiseSAE):
    """JumpReLU latents; sparsity = mean over the batch of the number of firing latents."""

    CONFIG_KEYS = frozenset(
        {"jumprelu_bandwidth", "jumprelu_sparsity_coef", "jumprelu_init_threshold"}
    )

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.sparsity_coef = cfg.jumprelu_sparsity_coef
        init = math.log(cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), init))

    def _train_mask(self, z: Tensor) -> Tensor:
        # firing (z > θ) or inside the kernel window (|z - θ| < ε/2)
        theta = self.log_threshold.detach().exp()
        return z > theta - self.cfg.jumprelu_bandwidth / 2

    def _activate(self, z: Tensor, cols: Tensor | None) -> tuple[Tensor, Tensor]:
        log_theta = self.log_threshold.expand_as(z) if cols is None else self.log_threshold[cols]
        bandwidth = self.cfg.jumprelu_bandwidth
        return jumprelu(z, log_theta, bandwidth), step(z, log_theta, bandwidth).sum()

    def _encode_eval(self, pre: Tensor) -> SparseLatents:
        keep = pre > self.log_threshold.exp().clamp_min(0)
        flat = keep.view(-1).nonzero().squeeze(1)
        p = Pattern.from_flat(flat, pre.shape[0], pre.shape[1])
        return SparseLatents(pre.view(-1)[flat], p.cols, p.row_offsets, self.cfg.d_sae)
