"""Sparse autoencoders: TopK, BatchTopK, JumpReLU, vanilla (ReLU + L1) and Matryoshka
BatchTopK, each in its own module, built from one `SAEConfig` by `build_sae`.

    sae = build_sae(SAEConfig(arch="batchtopk", d_in=768, mono_coef=3e-4))
    out = sae.forward_train(x, embeddings)     # SAEOutput(recon, latents, loss, path)
    out.loss.loss.backward()

Adding an architecture: one module with a `SparseAutoencoder` subclass (its
`CONFIG_KEYS` name the fields it reads), one name in `config.Arch` and one line in
`ARCHITECTURES`.
"""

from __future__ import annotations

from typing import Any

from monoray.configs import field_defaults
from monoray.errors import InputError
from monoray.sae.base import SAELoss, SAEOutput, SparseAutoencoder
from monoray.sae.batchtopk import BatchTopKSAE
from monoray.sae.config import (
    ARCH_NAMES,
    COMMON_KEYS,
    SCHEMA_VERSION,
    TOPK_FAMILY,
    SAEConfig,
    config_to_dict,
    parse_config,
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
    return ARCHITECTURES[cfg.arch](cfg)


def used_keys(arch: str) -> frozenset[str]:
    """The `SAEConfig` fields architecture `arch` reads."""
    return COMMON_KEYS | ARCHITECTURES[arch].CONFIG_KEYS


def drop_unused(flat: dict[str, Any]) -> dict[str, Any]:
    """A recorded flat config (checkpoint) without the SAE fields its architecture ignores.

    Older runs could set them (they never applied), so dropping them keeps those
    checkpoints loadable and resumable, with the same training.
    """
    arch = flat.get("arch")
    if arch not in ARCHITECTURES:
        return dict(flat)
    unused = set(field_defaults(SAEConfig)) - used_keys(arch)
    return {k: v for k, v in flat.items() if k not in unused}


def check_used_keys(cfg: SAEConfig, given: Any) -> None:
    """`InputError` for a key in `given` that `cfg.arch` ignores, set away from its default.

    At its default such a key changes nothing (every checkpoint's flat config holds all
    fields), so only a value that would silently not apply is refused.
    """
    used = used_keys(cfg.arch)
    defaults = field_defaults(SAEConfig)
    for key in given:
        if key not in used and getattr(cfg, key) != defaults[key]:
            raise InputError(f"{key}: the {cfg.arch} architecture does not use it (remove the key)")


def config_from_dict(d: dict[str, Any]) -> SAEConfig:
    """`parse_config(d)`, refusing keys the architecture would ignore (`check_used_keys`)."""
    cfg = parse_config(d)
    check_used_keys(cfg, d)
    return cfg


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
    "check_used_keys",
    "config_from_dict",
    "config_to_dict",
    "drop_unused",
    "parse_config",
    "used_keys",
]
