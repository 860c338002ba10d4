"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): BatchTopK latents whose nested
prefixes (the first m_1 < m_2 < ... < d_sae latents) must each reconstruct the
input on their own. The reconstruction term is the sum of the prefixes' errors,
so early latents learn general features and later ones refine them.

The model's reconstruction (and evaluation) uses all latents; the inference
threshold is BatchTopK's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monoray.sae.batchtopk import BatchTopKSAE
from monoray.sae.sparse import Pattern, decode_at


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK with a summed reconstruction loss over nested latent prefixes."""

    CONFIG_KEYS = BatchTopKSAE.CONFIG_KEYS | {"matryoshka_prefixes"}

    def _recon_sparse(
        self, x: Tensor, acts: Tensor, pattern: Pattern
    ) -> tuple[Tensor, dict[str, object]]:
        prefixes = self.cfg.prefixes
        bounds = torch.tensor(prefixes[:-1], dtype=pattern.cols.dtype, device=x.device)
        group = torch.bucketize(pattern.cols, bounds, right=True)
        partial: Tensor | None = None
        errors = []
        for g in range(len(prefixes)):
            entries = (group == g).nonzero().squeeze(1)
            part = decode_at(acts[entries], self.W_dec, pattern.select(entries))
            partial = part if partial is None else partial + part
            errors.append(self._recon_loss(partial + self.b_dec, x))
        assert partial is not None
        return partial + self.b_dec, self._terms(errors)

    def _recon_dense(self, x: Tensor, dense: Tensor) -> tuple[Tensor, dict[str, object]]:
        partial: Tensor | None = None
        errors = []
        lo = 0
        for size in self.cfg.prefixes:
            part = dense[:, lo:size] @ self.W_dec[lo:size]
            partial = part if partial is None else partial + part
            errors.append(self._recon_loss(partial + self.b_dec, x))
            lo = size
        assert partial is not None
        return partial + self.b_dec, self._terms(errors)

    def _terms(self, errors: list[Tensor]) -> dict[str, object]:
        return {
            "mse": torch.stack(errors).sum(),
            "prefix_mse": tuple(errors),
            "prefixes": self.cfg.prefixes,
        }
