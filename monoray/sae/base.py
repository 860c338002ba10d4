"""Shared parts of every SAE: weights, decoder-row constraint, loss record, MonoLoss hook.

Shapes: x [batch, d_in]; latents [batch, d_sae]; W_enc and W_dec [d_sae, d_in]
(row j of W_dec is the dictionary atom of latent j); b_enc [d_sae]; b_dec [d_in].
Encoding subtracts b_dec first: pre = (x - b_dec) W_encᵀ + b_enc.

Training step contract (what `monoray.train` does):

    out = sae.forward_train(x, embeddings)   # may update training buffers
    out.loss.loss.backward()
    sae.before_optimizer_step()               # grad of W_dec rows ⟂ rows
    clip; optimizer.step()
    sae.after_optimizer_step(optimizer)       # rows back to unit norm (+ TopK re-init)

`encode` / `decode` are for evaluation: batch independent and they never
change a parameter or buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoray import metrics
from monoray.sae.collective import LOCAL, Collective
from monoray.sae.config import ReconLoss, SAEConfig
from monoray.sae.sparse import (
    Pattern,
    SparseLatents,
    decode_at,
    decode_sparse,
    encode_at,
    encode_dense,
)

SPARSE_MAX_DENSITY = 0.05
"""Above this share of firing latents the sparse kernels lose to dense GEMMs on CPU
(measured: CSR SpMM does ~1/15 of the GEMM's flop rate); auto mode then goes dense."""


@dataclass(frozen=True, slots=True)
class SAELoss:
    """Loss terms of one training batch; `loss` is the total that is back-propagated."""

    mse: Tensor
    """Reconstruction loss (`SAEConfig.recon_loss`: plain or per-sample normalised MSE);
    matryoshka: the sum over its prefixes."""
    sparsity: Tensor
    """Raw sparsity term: vanilla L1 (mean over batch of Σ latents), jumprelu L0
    (mean over batch of the number firing, straight-through), 0 for the TopK family."""
    aux: Tensor
    """AuxK: reconstruction loss (same `recon_loss`) of the residual by the top dead latents;
    0 if no latent is dead."""
    mono: Tensor | None
    """MonoLoss 1 - mean batch MonoScore over active latents; None when mono_coef is 0."""
    l0: Tensor
    """Mean number of latents > 0 per sample (a statistic, not back-propagated)."""
    sparsity_coef: float = 0.0
    aux_coef: float = 0.0
    mono_coef: float = 0.0
    prefix_mse: tuple[Tensor, ...] = ()
    """matryoshka: reconstruction error (as `mse`) of each prefix, smallest first."""
    prefixes: tuple[int, ...] = ()
    """matryoshka: the prefix sizes of `prefix_mse`."""

    @property
    def loss(self) -> Tensor:
        total = self.mse + self.sparsity_coef * self.sparsity + self.aux_coef * self.aux
        if self.mono is not None:
            total = total + self.mono_coef * self.mono
        return total

    def metrics(self) -> dict[str, Tensor]:
        """Terms by name as detached 0-dim tensors (no host sync; `float()` them to log)."""
        out = {
            "loss": self.loss,
            "mse": self.mse,
            "sparsity": self.sparsity,
            "aux": self.aux,
            "l0": self.l0,
        }
        if self.mono is not None:
            out["mono"] = self.mono
        for size, value in zip(self.prefixes, self.prefix_mse, strict=True):
            out[f"mse_prefix_{size}"] = value
        return {k: v.detach() for k, v in out.items()}


@dataclass(frozen=True, slots=True)
class SAEOutput:
    """What `forward_train` returns."""

    recon: Tensor
    """[batch, d_in] reconstruction (with b_dec)."""
    latents: SparseLatents
    """Post-activation latents of the batch (values carry the graph)."""
    loss: SAELoss
    path: str
    """"sparse" or "dense": which implementation ran this batch."""


class SparseAutoencoder(nn.Module):
    """Base of every architecture: linear encoder/decoder with unit-norm decoder rows."""

    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset()
    """`SAEConfig` fields this architecture reads beyond `config.COMMON_KEYS`: its loss terms
    and options. Any other field set away from its default is refused (`check_used_keys`)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # The ranks a training batch is split over; the trainer sets `Ranks` for W > 1.
        self.collective: Collective = Collective()
        gen = torch.Generator().manual_seed(cfg.seed)
        atoms = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        atoms /= atoms.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(atoms)
        self.W_enc = nn.Parameter(atoms.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    # ---- public API ----------------------------------------------------------------
    def forward_train(self, x: Tensor, embeddings: Tensor | None = None) -> SAEOutput:
        """Loss terms of a training batch; the only method that updates training buffers.

        `embeddings` are MonoLoss' similarity embeddings of the same samples
        (default: `x`); they never need grad.
        """
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: Tensor) -> SparseLatents:
        """Evaluation latents of `x`: batch independent, changes no state."""
        return self._encode_eval(self._pre(x))

    @torch.no_grad()
    def decode(self, latents: SparseLatents | Tensor) -> Tensor:
        """[batch, d_in] reconstruction of sparse or dense latents."""
        if isinstance(latents, Tensor):
            return latents @ self.W_dec + self.b_dec
        dense = latents.nnz > SPARSE_MAX_DENSITY * latents.batch_size * latents.n_latents
        if dense or latents.values.device.type != "cpu":
            return latents.to_dense() @ self.W_dec + self.b_dec
        return decode_sparse(latents, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of `x` as in evaluation (no state change)."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the component of each decoder row's gradient parallel to the row."""
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        dots = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)  # no [d_sae, d_in] temp
        grad.addcmul_(w, dots / w.norm(dim=1, keepdim=True).square(), value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Renormalise decoder rows to unit norm (subclasses may add dead-latent handling)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- helpers for the architectures -----------------------------------------------
    def _encode_eval(self, pre: Tensor) -> SparseLatents:
        raise NotImplementedError

    def _pre(self, x: Tensor) -> Tensor:
        """[batch, d_sae] pre-activations without autograd (the one unavoidable GEMM)."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    def _pre_dense(self, x: Tensor) -> Tensor:
        """[batch, d_sae] pre-activations with plain autograd (the dense reference)."""
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def _attach_dense(self, x: Tensor, pre: Tensor) -> Tensor:
        """`pre` from `_pre` attached to the graph with a dense backward."""
        return encode_dense(x, self.b_dec, self.W_enc, self.b_enc, pre)

    def _encode_at(self, x: Tensor, pattern: Pattern, pre_values: Tensor) -> Tensor:
        return encode_at(x, self.b_dec, self.W_enc, self.b_enc, pattern, pre_values)

    def _decode_at(self, values: Tensor, pattern: Pattern) -> Tensor:
        return decode_at(values, self.W_dec, pattern) + self.b_dec

    def _sparse_by_device(self, x: Tensor) -> bool:
        """impl "auto": the sparse kernels on CPU; dense GEMMs on accelerators."""
        if self.cfg.impl == "auto":
            return x.device.type == "cpu"
        return self.cfg.impl == "sparse"

    def _mono(self, embeddings: Tensor, latents: SparseLatents | Tensor) -> Tensor | None:
        """MonoLoss of the batch, or None (not computed at all) when mono_coef is 0."""
        if self.cfg.mono_coef == 0:
            return None
        emb = embeddings.detach()
        eps, precision = self.cfg.mono_eps, self.cfg.mono_precision
        if self.collective.size > 1:  # the global batch's loss; float64 whatever `precision`
            dense = latents if isinstance(latents, Tensor) else latents.to_dense()
            group = getattr(self.collective, "group", None)
            loss = metrics.mono_loss_global(emb, dense, eps=eps, group=group)
            return self.collective.share(loss)
        if isinstance(latents, Tensor):
            return metrics.mono_loss(emb, latents, eps=eps, precision=precision)
        return metrics.mono_loss_rows(
            emb,
            latents.values,
            latents.col_indices,
            latents.row_offsets,
            latents.n_latents,
            eps=eps,
            precision=precision,
        )

    def _recon_loss(self, recon: Tensor, target: Tensor) -> Tensor:
        assert self.cfg.recon_loss is not None  # resolved per arch by SAEConfig
        return recon_loss(recon, target, self.cfg.recon_loss, self.collective)

    def _loss(self, **terms: Any) -> SAELoss:
        zero = terms["mse"].new_zeros(())
        terms.setdefault("sparsity", zero)
        terms.setdefault("aux", zero)
        return SAELoss(mono_coef=self.cfg.mono_coef, aux_coef=self.cfg.aux_coef, **terms)


def recon_loss(
    recon: Tensor, target: Tensor, kind: ReconLoss, collective: Collective = LOCAL
) -> Tensor:
    """`SAEConfig.recon_loss` of a (global) batch: "mse" or "normalized_mse" (see there)."""
    if kind == "mse":
        return collective.mean((recon - target).pow(2))
    energy = target.pow(2).mean(dim=1)
    per_sample = (recon - target).pow(2).mean(dim=1)
    return collective.mean(per_sample / torch.where(energy > 0, energy, 1.0))


def mean_l0(latents: SparseLatents, collective: Collective = LOCAL) -> Tensor:
    fired = (latents.values.detach() > 0).sum().to(latents.values.dtype)
    return fired / (collective.rows if collective.size > 1 else latents.batch_size)
