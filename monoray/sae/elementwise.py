"""Shared step of the architectures whose activation is elementwise (JumpReLU, vanilla
ReLU): the number of firing latents is not fixed, so with impl "auto" on CPU each
batch goes sparse only when few enough latents fire (`SPARSE_MAX_DENSITY`), and
otherwise reuses its no-grad GEMM with a dense backward. The entries the sparse
path keeps are `_train_mask` (those with a non-zero forward or gradient).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from monoray.sae.base import SPARSE_MAX_DENSITY, SAEOutput, SparseAutoencoder, mean_l0
from monoray.sae.sparse import Pattern, SparseLatents


class ElementwiseSAE(SparseAutoencoder):
    """Base of JumpReLU and vanilla: z = ReLU(pre), a = activation(z), sparsity term."""

    sparsity_coef: float = 0.0

    def forward_train(
        self, x: Tensor, embeddings: Tensor | None = None, *, pre: Tensor | None = None
    ) -> SAEOutput:
        emb = x if embeddings is None else embeddings
        self.collective.begin_batch(x.shape[0])
        impl = self.cfg.impl
        if impl == "dense" or (impl == "auto" and x.device.type != "cpu"):
            pre = self._pre_dense(x) if pre is None else self._attach_dense(x, pre)
            return self._train_dense(x, emb, pre)
        pre = (self._pre(x) if pre is None else pre).clamp_min_(0)
        mask = self._train_mask(pre)
        if impl == "auto" and int(mask.count_nonzero()) > SPARSE_MAX_DENSITY * mask.numel():
            return self._train_dense(x, emb, self._attach_dense(x, pre))
        flat = mask.view(-1).nonzero().squeeze(1)
        pattern = Pattern.from_flat(flat, pre.shape[0], pre.shape[1])
        z = F.relu(self._encode_at(x, pattern, pre.view(-1)[flat]))
        acts, sparsity = self._activate(z, pattern.cols)
        latents = SparseLatents(acts, pattern.cols, pattern.row_offsets, self.cfg.d_sae)
        recon = self._decode_at(acts, pattern)
        mono = self._mono(emb, latents)
        return self._output(x, recon, latents, sparsity, mono, "sparse")

    def _train_dense(self, x: Tensor, emb: Tensor, pre: Tensor) -> SAEOutput:
        acts, sparsity = self._activate(F.relu(pre), None)
        recon = acts @ self.W_dec + self.b_dec
        mono = self._mono(emb, acts)
        return self._output(x, recon, SparseLatents.from_dense(acts), sparsity, mono, "dense")

    def _output(
        self,
        x: Tensor,
        recon: Tensor,
        latents: SparseLatents,
        sparsity: Tensor,
        mono: Tensor | None,
        path: str,
    ) -> SAEOutput:
        loss = self._loss(
            mse=self._recon_loss(recon, x),
            sparsity=sparsity / self.collective.rows,
            sparsity_coef=self.sparsity_coef,
            mono=mono,
            l0=mean_l0(latents, self.collective),
        )
        return SAEOutput(recon, latents, loss, path)

    def _train_mask(self, z: Tensor) -> Tensor:
        """[batch, d_sae] bool: entries of z = ReLU(pre) with a value or gradient."""
        raise NotImplementedError

    def _activate(self, z: Tensor, cols: Tensor | None) -> tuple[Tensor, Tensor]:
        """(activations, summed sparsity penalty) of z, dense ([batch, d_sae], cols None)
        or at the sparse entries whose latents are `cols`."""
        raise NotImplementedError
