"""Sparse autoencoders: TopK, BatchTopK, JumpReLU, vanilla (ReLU + L1) and Matryoshka
BatchTopK, each in its own module, built from one `SAEConfig` by `build_sae`.

    sae = build_sae(SAEConfig(arch="batchtopk", d_in=768, mono_coef=3e-4))
    out = sae.forward_train(x, embeddings)     # SAEOutput(recon, latents, loss, path)
    out.loss.loss.backward()

Adding an architecture: one module with a `SparseAutoencoder` subclass, one name
in `config.Arch`, one line in `ARCHITECTURES` and one case in `build_sae`.
"""

from __future__ import annotations

import typing

from monoray.errors import InputError
from monoray.sae.base import SAELoss, SAEOutput, SparseAutoencoder
from monoray.sae.batchtopk import BatchTopKSAE
from monoray.sae.config import (
    ARCH_NAMES,
    SCHEMA_VERSION,
    TOPK_FAMILY,
    SAEConfig,
    config_from_dict,
    config_to_dict,
)
from monoray.sae.jumprelu import JumpReLUSAE
from monoray.sae.matryoshka import MatryoshkaSAE
from monoray.sae.sparse import SparseLatents
from monoray.sae.topk import TopKSAE
from monoray.sae.vanilla import VanillaSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "vanilla": VanillaSAE,
    "matryoshka": MatryoshkaSAE,
}
"""Architecture name (`SAEConfig.arch`) -> module class."""


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """The architecture `cfg.arch` names, initialised from `cfg.seed`."""
    match cfg.arch:
        case "topk":
            return TopKSAE(cfg)
        case "batchtopk":
            return BatchTopKSAE(cfg)
        case "jumprelu":
            return JumpReLUSAE(cfg)
        case "vanilla":
            return VanillaSAE(cfg)
        case "matryoshka":
            return MatryoshkaSAE(cfg)
        case _:
            typing.assert_never(cfg.arch)
    raise InputError(f"unknown arch {cfg.arch!r}")  # unreachable: SAEConfig validates arch


__all__ = [
    "ARCHITECTURES",
    "ARCH_NAMES",
    "SCHEMA_VERSION",
    "TOPK_FAMILY",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "SAEConfig",
    "SAELoss",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseLatents",
    "TopKSAE",
    "VanillaSAE",
    "build_sae",
    "config_from_dict",
    "config_to_dict",
]
