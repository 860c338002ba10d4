"""The loss terms an SAE can train with, each owning the `SAEConfig` keys it reads.

An architecture declares its terms (`SparseAutoencoder.TERMS`); the loss config
(`SAELossConfig`) is exactly the keys of all terms, so a key belongs to the loss
because a term owns it, and to the model config otherwise. Besides loss weights, a
term owns the training-time rule that goes with it (AuxK's dead-latent window,
TopK's re-initialisation, BatchTopK's threshold EMA): what training reads and a
trained model, evaluated, does not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LossTerm:
    """One term of the training objective (or rule of the training step) and its keys."""

    name: str
    keys: frozenset[str]


RECON = LossTerm("recon", frozenset({"recon_loss"}))
"""Reconstruction error (plain or per-sample normalised MSE)."""
MONO = LossTerm("mono", frozenset({"mono_coef", "mono_eps", "mono_precision"}))
"""MonoLoss λ · (1 - mean batch MonoScore)."""
AUX_K = LossTerm("aux_k", frozenset({"aux_k", "aux_coef", "dead_steps_threshold"}))
"""AuxK: the top dead latents reconstruct the residual (TopK family)."""
DEAD_REINIT = LossTerm("dead_reinit", frozenset({"dead_reinit_steps"}))
"""Re-initialise long-dead latents after the optimizer step (topk)."""
THRESHOLD = LossTerm("threshold", frozenset({"threshold_ema"}))
"""EMA of the smallest kept activation, the inference threshold (BatchTopK)."""
L1 = LossTerm("l1", frozenset({"l1_coef"}))
"""L1 on the latents (vanilla)."""
L0 = LossTerm("l0", frozenset({"jumprelu_sparsity_coef", "jumprelu_bandwidth"}))
"""Straight-through L0 on the firing latents (jumprelu)."""

TERMS: tuple[LossTerm, ...] = (RECON, MONO, AUX_K, DEAD_REINIT, THRESHOLD, L1, L0)
LOSS_KEYS: frozenset[str] = frozenset().union(*(t.keys for t in TERMS))
"""The fields of `SAELossConfig`."""
