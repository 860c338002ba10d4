"""TopK SAE (keep the k largest pre-activations per sample, then ReLU) and the
machinery it shares with BatchTopK and Matryoshka: AuxK on dead latents.

Dead latents: `steps_since_fired` counts, per latent, training steps since it
last had a value > 0; at `dead_steps_threshold` the latent is dead and AuxK
makes the top `aux_k` dead pre-activations of each sample reconstruct the
residual x - x̂ (weight `aux_coef`; Gao et al. 2024). TopK alone also
re-initialises latents dead for `dead_reinit_steps`: `forward_train` picks the
batch's worst reconstructed samples and `after_optimizer_step` sets the
latents' decoder and encoder rows to their normalised residuals, zeroes b_enc
and, given the optimizer, the Adam moments of those rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from monoray.sae.base import SAEOutput, SparseAutoencoder, mean_l0
from monoray.sae.config import SAEConfig
from monoray.sae.sparse import Pattern, SparseLatents, decode_at, topk_rows


class TopKFamily(SparseAutoencoder):
    """Shared training step of the fixed-budget architectures (sparse and dense paths)."""

    CONFIG_KEYS = frozenset({"k", "aux_k", "aux_coef", "dead_steps_threshold"})  # AuxK

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("steps_since_fired", torch.zeros(cfg.d_sae, dtype=torch.int64))
        self.steps_since_fired: Tensor

    def forward_train(self, x: Tensor, embeddings: Tensor | None = None) -> SAEOutput:
        emb = x if embeddings is None else embeddings
        self.collective.begin_batch(x.shape[0])
        dead = self.steps_since_fired >= self.cfg.dead_steps_threshold
        if self._sparse_by_device(x):
            pre = self._pre(x)
            pattern, pre_values = self._select_train(pre)
            acts = F.relu(self._encode_at(x, pattern, pre_values))
            latents = SparseLatents(acts, pattern.cols, pattern.row_offsets, self.cfg.d_sae)
            recon, terms = self._recon_sparse(x, acts, pattern)
            aux = self._aux_sparse(x, pre, recon, dead)
            mono = self._mono(emb, latents)
            path = "sparse"
        else:
            pre = self._pre_dense(x)
            dense = self._activate_dense(pre)
            latents = SparseLatents.from_dense(dense)
            recon, terms = self._recon_dense(x, dense)
            aux = self._aux_dense(x, pre, recon, dead)
            mono = self._mono(emb, dense)
            path = "dense"
        self._count_fired(latents)
        self._plan_reinit(x, recon)
        if aux is not None:
            terms["aux"] = aux
        loss = self._loss(mono=mono, l0=mean_l0(latents, self.collective), **terms)
        return SAEOutput(recon, latents, loss, path)

    # ---- per architecture ----------------------------------------------------------
    def _select_train(self, pre: Tensor) -> tuple[Pattern, Tensor]:
        """Entries kept in training (may update buffers): pattern and their pre-activations."""
        raise NotImplementedError

    def _activate_dense(self, pre: Tensor) -> Tensor:
        """Dense reference of `_select_train` + ReLU: [batch, d_sae] latents."""
        raise NotImplementedError

    def _recon_sparse(
        self, x: Tensor, acts: Tensor, pattern: Pattern
    ) -> tuple[Tensor, dict[str, object]]:
        recon = decode_at(acts, self.W_dec, pattern) + self.b_dec
        return recon, {"mse": self._recon_loss(recon, x)}

    def _recon_dense(self, x: Tensor, dense: Tensor) -> tuple[Tensor, dict[str, object]]:
        recon = dense @ self.W_dec + self.b_dec
        return recon, {"mse": self._recon_loss(recon, x)}

    # ---- dead latents --------------------------------------------------------------
    def _n_aux(self, dead: Tensor) -> int:
        if self.cfg.aux_coef == 0:
            return 0
        return min(self.cfg.aux_k, int(dead.sum()))

    def _aux_sparse(self, x: Tensor, pre: Tensor, recon: Tensor, dead: Tensor) -> Tensor | None:
        n_aux = self._n_aux(dead)
        if n_aux == 0:
            return None
        dead_idx = dead.nonzero().squeeze(1)
        values, j = topk_rows(pre[:, dead_idx], n_aux)
        pattern = Pattern.fixed_k(dead_idx[j], self.cfg.d_sae)
        acts = F.relu(self._encode_at(x, pattern, values.reshape(-1)))
        return self._recon_loss(decode_at(acts, self.W_dec, pattern), (x - recon).detach())

    def _aux_dense(self, x: Tensor, pre: Tensor, recon: Tensor, dead: Tensor) -> Tensor | None:
        n_aux = self._n_aux(dead)
        if n_aux == 0:
            return None
        values, idx = pre.masked_fill(~dead, float("-inf")).topk(n_aux, dim=1)
        acts = torch.zeros_like(pre).scatter(1, idx, F.relu(values))
        return self._recon_loss(acts @ self.W_dec, (x - recon).detach())

    @torch.no_grad()
    def _count_fired(self, latents: SparseLatents) -> None:
        fired = torch.zeros_like(self.steps_since_fired, dtype=torch.bool)
        fired[latents.col_indices[latents.values > 0]] = True
        fired = self.collective.any_(fired)
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)

    def _plan_reinit(self, x: Tensor, recon: Tensor) -> None:
        """TopK only (see module doc)."""


class TopKSAE(TopKFamily):
    """k largest pre-activations per sample, then ReLU (Makhzani & Frey; Gao et al.)."""

    CONFIG_KEYS = TopKFamily.CONFIG_KEYS | {"dead_reinit_steps"}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self._pending_reinit: tuple[Tensor, Tensor] | None = None

    def _select_train(self, pre: Tensor) -> tuple[Pattern, Tensor]:
        values, cols = topk_rows(pre, self.cfg.k)
        return Pattern.fixed_k(cols, self.cfg.d_sae), values.reshape(-1)

    def _activate_dense(self, pre: Tensor) -> Tensor:
        values, idx = pre.topk(self.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, F.relu(values))

    def _encode_eval(self, pre: Tensor) -> SparseLatents:
        values, cols = topk_rows(pre, self.cfg.k)
        p = Pattern.fixed_k(cols, self.cfg.d_sae)
        return SparseLatents(F.relu(values).reshape(-1), p.cols, p.row_offsets, self.cfg.d_sae)

    @torch.no_grad()
    def _plan_reinit(self, x: Tensor, recon: Tensor) -> None:
        self._pending_reinit = None
        if self.cfg.dead_reinit_steps == 0:
            return
        due = (self.steps_since_fired >= self.cfg.dead_reinit_steps).nonzero().squeeze(1)
        if due.numel() == 0:
            return
        # The global batch's worst rows (stable: equal norms in batch order, at any W).
        coll = self.collective
        residual = x - recon
        norms = residual.norm(dim=1)
        worst = coll.cat_rows(norms).argsort(descending=True, stable=True)
        pick = worst[torch.arange(due.numel(), device=x.device) % worst.numel()]
        directions = coll.rows_at(residual / norms[:, None].clamp_min(1e-12), pick)
        self._pending_reinit = (due, directions)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().after_optimizer_step(optimizer)
        if self._pending_reinit is None:
            return
        idx, directions = self._pending_reinit
        self._pending_reinit = None
        self.W_dec[idx] = directions.to(self.W_dec.dtype)
        self.W_enc[idx] = directions.to(self.W_enc.dtype)
        self.b_enc[idx] = 0
        self.steps_since_fired[idx] = 0
        if optimizer is not None:
            for param in (self.W_dec, self.W_enc, self.b_enc):
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value[idx] = 0
