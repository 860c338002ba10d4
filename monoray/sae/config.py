"""`SAEConfig`: one frozen record for every architecture.

A config is data: hashable, printable, JSON-able through `config_to_dict`, and
rebuilt by `config_from_dict`, which rejects unknown keys. Fields that only one
architecture reads say so in their docstring; the others ignore them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from monoray.configs import coerce, reject_unknown_keys
from monoray.errors import InputError
from monoray.metrics.loss import PRECISIONS, Precision

Arch = Literal["topk", "batchtopk", "jumprelu", "vanilla", "matryoshka"]
ARCH_NAMES: tuple[str, ...] = typing.get_args(Arch)
TOPK_FAMILY: tuple[str, ...] = ("topk", "batchtopk", "matryoshka")
"""Architectures with a fixed L0 budget `k` (and AuxK on dead latents)."""

ReconLoss = Literal["mse", "normalized_mse"]
RECON_LOSSES: tuple[str, ...] = typing.get_args(ReconLoss)
REFERENCE_RECON_LOSS: dict[str, ReconLoss] = {"topk": "normalized_mse"}
"""The paper's reference code: TopK trains on the per-sample normalised MSE, every other
architecture on plain MSE (hence its TopK λ is ~d times its BatchTopK λ)."""

Impl = Literal["auto", "sparse", "dense"]
IMPLS: tuple[str, ...] = typing.get_args(Impl)

SCHEMA_VERSION = 1

COMMON_KEYS = frozenset(
    {"arch", "d_in", "d_sae", "mono_coef", "mono_eps", "mono_precision", "recon_loss", "impl"}
    | {"seed", "schema_version"}
)
"""Fields every architecture reads: shape, MonoLoss, reconstruction loss, implementation, init."""


@dataclass(frozen=True, slots=True)
class SAEConfig:
    """Architecture and loss of one sparse autoencoder (paper App. B defaults)."""

    arch: Arch
    """"topk", "batchtopk", "jumprelu", "vanilla" (ReLU + L1) or "matryoshka" (BatchTopK)."""
    d_in: int
    """Width of the input features."""
    d_sae: int = 8192
    """Number of latents (dictionary size)."""
    k: int = 64
    """TopK family: non-zero latents per sample (BatchTopK: k * batch over the whole batch)."""
    mono_coef: float = 0.0
    """MonoLoss weight λ: loss = base + λ * (1 - mean batch MonoScore). 0 skips MonoLoss."""
    mono_eps: float = 1e-6
    """MonoLoss: a latent counts as active when its batch denominator exceeds this."""
    mono_precision: Precision = "float32"
    """MonoLoss: dtype of its O(nnz·d) products (P = AᵀH and the sampled backward);
    everything else is float64. "float32" is ~2.5x faster on CPU with gradients within
    ~1e-5 relative of "float64" (the exact reference); see `monoray.metrics.mono_loss`."""
    l1_coef: float = 1e-4
    """vanilla: weight of the L1 term (mean over the batch of the summed latent values)."""
    jumprelu_bandwidth: float = 1e-3
    """jumprelu: width of the rectangle kernel of the straight-through estimator."""
    jumprelu_sparsity_coef: float = 1e-3
    """jumprelu: weight of the L0 term (mean over the batch of the number of firing latents)."""
    jumprelu_init_threshold: float = 1e-3
    """jumprelu: initial threshold θ. Unit-norm inputs give pre-activations of std ≈ d_in**-0.5
    at init, so 1e-3 lets about half of the latents fire at the first step."""
    aux_k: int = 512
    """TopK family: dead latents (at most this many per sample) that reconstruct the residual."""
    aux_coef: float = 1 / 32
    """TopK family: weight of the AuxK term; 0 disables it."""
    dead_steps_threshold: int = 256
    """TopK family: a latent that has not fired for this many training steps is dead (AuxK)."""
    dead_reinit_steps: int = 1024
    """topk: a latent dead for this many steps is re-initialised from the batch's worst
    reconstructed inputs after the optimizer step; 0 disables re-initialisation."""
    threshold_ema: float = 0.95
    """batchtopk, matryoshka: decay of the EMA of the smallest kept activation, which is the
    inference threshold (evaluation then does not depend on the batch)."""
    matryoshka_prefixes: tuple[int, ...] | None = None
    """matryoshka: increasing prefix sizes ending at d_sae; None means
    (d_sae // 16, d_sae // 4, d_sae). The loss sums the reconstruction error of every prefix."""
    recon_loss: ReconLoss | None = None
    """Reconstruction and AuxK loss: "mse" = mean over batch and dims of (x̂ - x)²;
    "normalized_mse" = mean over the batch of mean_d (x̂ - x)² / mean_d x² (a sample with
    x = 0 counts its plain error). None: the reference's choice, normalized_mse for topk and
    mse for the others."""
    impl: Impl = "auto"
    """"sparse" (work only where latents fire), "dense" (plain autograd reference) or "auto":
    on CPU the TopK family runs sparse and jumprelu/vanilla pick sparse per batch when at most
    5% of the latents fire; on CUDA auto is dense (a guess, not measured: GEMMs are cheap
    there and the sparse path syncs the host). Both give the same loss and gradients."""
    seed: int = 42
    """The run's one seed (the paper's 42): the weight initialisation and, with the epoch
    number, every epoch's shuffle and sampling (`TrainConfig.seed` reads it)."""
    schema_version: int = SCHEMA_VERSION
    """Version of this record's layout; `config_from_dict` rejects other versions."""

    def __post_init__(self) -> None:
        if self.arch not in ARCH_NAMES:
            raise InputError(f"arch must be one of {', '.join(ARCH_NAMES)}, got {self.arch!r}")
        if self.mono_precision not in PRECISIONS:
            raise InputError(
                f"mono_precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.mono_precision!r}"
            )
        if self.recon_loss is None:
            object.__setattr__(self, "recon_loss", REFERENCE_RECON_LOSS.get(self.arch, "mse"))
        if self.recon_loss not in RECON_LOSSES:
            raise InputError(
                f"recon_loss must be one of {', '.join(RECON_LOSSES)}, got {self.recon_loss!r}"
            )
        if self.impl not in IMPLS:
            raise InputError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.schema_version != SCHEMA_VERSION:
            raise InputError(
                f"schema_version {self.schema_version} is not supported (this is {SCHEMA_VERSION})"
            )
        for name in ("d_in", "d_sae", "k", "aux_k", "dead_steps_threshold"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("dead_reinit_steps", self.dead_reinit_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.arch in TOPK_FAMILY and self.k > self.d_sae:
            raise InputError(f"k {self.k} is larger than d_sae {self.d_sae}")
        for name in ("mono_coef", "l1_coef", "jumprelu_sparsity_coef", "aux_coef"):
            _check_float(name, getattr(self, name), minimum=0.0)
        for name in ("mono_eps", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            _check_float(name, getattr(self, name), minimum=0.0, strict=True)
        _check_float("threshold_ema", self.threshold_ema, minimum=0.0)
        if self.threshold_ema >= 1:
            raise InputError(f"threshold_ema must be < 1, got {self.threshold_ema}")
        if isinstance(self.matryoshka_prefixes, list):  # from JSON / YAML
            object.__setattr__(self, "matryoshka_prefixes", tuple(self.matryoshka_prefixes))
        if self.matryoshka_prefixes is not None:
            p = self.matryoshka_prefixes
            if not isinstance(p, tuple) or not p or not all(_is_int(v) for v in p):
                raise InputError(f"matryoshka_prefixes must be a tuple of ints, got {p!r}")
            if p[0] < 1 or any(b <= a for a, b in itertools.pairwise(p)):
                raise InputError(f"matryoshka_prefixes must increase from >= 1, got {p}")
            if p[-1] != self.d_sae:
                raise InputError(f"matryoshka_prefixes must end at d_sae {self.d_sae}, got {p}")

    @property
    def prefixes(self) -> tuple[int, ...]:
        """Matryoshka prefix sizes with the default filled in (duplicates dropped)."""
        if self.matryoshka_prefixes is not None:
            return self.matryoshka_prefixes
        return tuple(sorted({max(1, self.d_sae // 16), max(1, self.d_sae // 4), self.d_sae}))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not _is_int(value):
        raise InputError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise InputError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


def config_to_dict(cfg: SAEConfig) -> dict[str, Any]:
    """JSON-ready dict of every field (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    if d["matryoshka_prefixes"] is not None:
        d["matryoshka_prefixes"] = list(d["matryoshka_prefixes"])
    return d


def parse_config(d: dict[str, Any]) -> SAEConfig:
    """Build an `SAEConfig`; an unknown key raises `InputError` naming it (did-you-mean hint).

    Numbers given as strings ("1e-4", as YAML writes them) or as floats with an
    integer value are converted to the field's type (`monoray.configs.coerce`).
    """
    fields = tuple(f.name for f in dataclasses.fields(SAEConfig))
    reject_unknown_keys(d, fields, "SAE config")
    hints = typing.get_type_hints(SAEConfig)
    kwargs = {key: coerce(key, value, hints[key]) for key, value in d.items()}
    for key in ("arch", "d_in"):
        if key not in kwargs:
            raise InputError(f"SAE config needs {key!r}")
    return SAEConfig(**kwargs)
