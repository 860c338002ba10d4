"""BatchTopK SAE (Bussmann et al. 2024): ReLU, then keep the k * batch largest
activations of the whole batch.

Training selection depends on the batch, so evaluation uses a learned,
batch-independent threshold instead: `threshold` is an EMA (decay
`threshold_ema`) of the smallest positive activation kept in each training
batch, updated only by `forward_train`; `encode` keeps activations > threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from monoray.sae.config import SAEConfig
from monoray.sae.sparse import Pattern, SparseLatents
from monoray.sae.topk import TopKFamily


class BatchTopKSAE(TopKFamily):
    """k * batch largest ReLU activations per training batch; threshold at inference."""

    CONFIG_KEYS = TopKFamily.CONFIG_KEYS | {"threshold_ema"}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        self.threshold: Tensor
        self.threshold_updates: Tensor

    def _select_train(self, pre: Tensor) -> tuple[Pattern, Tensor]:
        acts = pre.clamp_min_(0)
        values, flat, smallest = self.collective.batch_topk(acts, self.cfg.k * self.collective.rows)
        self._update_threshold(smallest)
        return Pattern.from_flat(flat, acts.shape[0], acts.shape[1]), values

    def _activate_dense(self, pre: Tensor) -> Tensor:
        acts = F.relu(pre)
        n_keep = self.cfg.k * self.collective.rows
        _, flat, smallest = self.collective.batch_topk(acts.detach(), n_keep)
        self._update_threshold(smallest)
        values = acts.reshape(-1)[flat]
        return torch.zeros_like(acts).reshape(-1).scatter(0, flat, values).view_as(acts)

    @torch.no_grad()
    def _update_threshold(self, smallest: Tensor) -> None:
        """EMA of the smallest positive kept value of the global batch (no host sync)."""
        smallest = smallest.to(self.threshold.dtype)
        beta = self.cfg.threshold_ema
        ema = torch.where(
            self.threshold_updates == 0, smallest, beta * self.threshold + (1 - beta) * smallest
        )
        valid = torch.isfinite(smallest)
        self.threshold.copy_(torch.where(valid, ema, self.threshold))
        self.threshold_updates.add_(valid.to(torch.int64))

    def _encode_eval(self, pre: Tensor) -> SparseLatents:
        keep = pre > self.threshold.clamp_min(0)
        flat = keep.view(-1).nonzero().squeeze(1)
        p = Pattern.from_flat(flat, pre.shape[0], pre.shape[1])
        return SparseLatents(pre.view(-1)[flat], p.cols, p.row_offsets, self.cfg.d_sae)
