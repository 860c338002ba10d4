"""Vanilla SAE: ReLU latents with an L1 penalty (weight `l1_coef`)."""

from __future__ import annotations

from torch import Tensor

from monoray.sae.config import SAEConfig
from monoray.sae.elementwise import ElementwiseSAE
from monoray.sae.sparse import Pattern, SparseLatents


class VanillaSAE(ElementwiseSAE):
    """a = ReLU(pre); sparsity = mean over the batch of Σ_j a_j (decoder rows are unit norm)."""

    CONFIG_KEYS = frozenset({"l1_coef"})

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.sparsity_coef = cfg.l1_coef

    def _train_mask(self, z: Tensor) -> Tensor:
        return z > 0

    def _activate(self, z: Tensor, cols: Tensor | None) -> tuple[Tensor, Tensor]:
        return z, z.sum()

    def _encode_eval(self, pre: Tensor) -> SparseLatents:
        flat = (pre > 0).view(-1).nonzero().squeeze(1)
        p = Pattern.from_flat(flat, pre.shape[0], pre.shape[1])
        return SparseLatents(pre.view(-1)[flat], p.cols, p.row_offsets, self.cfg.d_sae)
