"""Input normalisation: what is done to every feature row before the SAE encodes it."""

from __future__ import annotations

from torch import Tensor

NORMALIZE = ("unit", "none")
"""Input normalisations: "unit" scales each sample to unit L2 norm (the paper's setting)."""


def normalize_inputs(x: Tensor, how: str) -> Tensor:
    """[B, d] -> [B, d]: "unit" scales each row to L2 norm 1 (zero rows stay 0); "none" as is."""
    if how == "unit":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if how == "none":
        return x
    raise ValueError(f"unknown normalisation {how!r}")
