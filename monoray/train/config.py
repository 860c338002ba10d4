"""`TrainConfig`: the SAE config plus everything about optimisation, as one frozen record.

A run's config travels flat (`{"arch": "batchtopk", "k": 32, "lr": 1e-4, ...}`):
that is what the CLI, YAML search spaces, Ray Tune and checkpoints hold.
`from_dict` builds the nested config from it and rejects unknown keys; `to_dict`
is its inverse.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from monoray.configs import coerce, reject_unknown_keys
from monoray.errors import InputError
from monoray.runs.device import check_device
from monoray.sae import SAEConfig, config_from_dict, config_to_dict
from monoray.sae.inputs import NORMALIZE
from monoray.train.schedule import check_schedule

DERIVED_KEYS = ("expansion",)
"""Flat keys that are not fields but set one: `expansion` sets `d_sae = expansion * d_in`."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One SAE training run: architecture (`sae`) and optimisation. Defaults follow the paper."""

    sae: SAEConfig
    """Architecture and loss: arch, d_in, d_sae, k, mono_coef, ... (see `monoray.sae`)."""
    lr: float = 1e-4
    """Adam learning rate (peak value when a schedule is on; see `monoray.train.schedule`)."""
    lr_scheduler_name: str = "constant"
    """LR decay: constant (the paper's), linear or cosine down to lr_end_factor · lr."""
    lr_warm_up_steps: int = 0
    """Steps of linear lr warm-up from lr/N to lr (0: none)."""
    lr_decay_steps: int = 0
    """Decay over the run's last N steps (0: every step after the warm-up)."""
    lr_end_factor: float = 0.1
    """Final lr as a fraction of lr, for linear and cosine decay."""
    mono_warm_up_steps: int = 0
    """Steps of linear warm-up of λ (mono_coef) from λ/N to λ (0: none)."""
    l1_warm_up_steps: int = 0
    """Steps of linear warm-up of the sparsity coefficient (L1 / JumpReLU L0) (0: none)."""
    adam_eps: float = 6.25e-10
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Max global L2 norm of the gradient per step; 0 disables clipping."""
    epochs: int = 50
    """Passes over the train split."""
    batch_size: int = 2048
    """Training batch size in samples (the last batch of an epoch may be smaller)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    normalize: str = "unit"
    """Input normalisation before the SAE ("unit" or "none"); MonoScore embeddings stay raw."""
    eval_batch_size: int = 4096
    """Batch size of the per-epoch validation pass (results do not depend on it)."""

    @property
    def seed(self) -> int:
        """The run's one seed (`SAEConfig.seed`): the model init and, with the epoch number,
        every epoch's shuffle and sampling."""
        return self.sae.seed

    # --- flat view -----------------------------------------------------------
    @classmethod
    def own_keys(cls) -> tuple[str, ...]:
        """Optimisation keys (everything but the nested SAE config)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "sae")

    @staticmethod
    def sae_keys() -> tuple[str, ...]:
        """Keys of the nested `SAEConfig`."""
        return tuple(f.name for f in dataclasses.fields(SAEConfig))

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        """Every flat key `from_dict` accepts."""
        return cls.sae_keys() + cls.own_keys() + DERIVED_KEYS

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: SAE fields and optimisation fields side by side."""
        d = config_to_dict(self.sae)
        d.update({k: getattr(self, k) for k in self.own_keys()})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from flat keys; any problem is one `InputError` naming the key.

        `d_in` (the feature width) is required. `expansion` may stand in for
        `d_sae` (`d_sae = expansion * d_in`); giving both requires they agree.
        """
        reject_unknown_keys(d, cls.allowed_keys(), "config")
        d = {k: v for k, v in d.items() if v is not None}
        sae_fields = set(cls.sae_keys())
        if "d_in" not in d:
            raise InputError("config needs d_in (the feature width)")
        own_hints = typing.get_type_hints(cls)
        own = {k: coerce(k, v, own_hints[k]) for k, v in d.items() if k in cls.own_keys()}
        sae_kwargs = {k: v for k, v in d.items() if k in sae_fields}
        if "expansion" in d:
            expansion = coerce("expansion", d["expansion"], float)
            d_in = coerce("d_in", d["d_in"], int)
            if expansion <= 0:
                raise InputError(f"expansion must be > 0, got {expansion}")
            d_sae = round(expansion * d_in)
            if "d_sae" in sae_kwargs and coerce("d_sae", sae_kwargs["d_sae"], int) != d_sae:
                raise InputError(
                    f"d_sae {sae_kwargs['d_sae']} and expansion {expansion} disagree "
                    f"(expansion * d_in = {d_sae}); give one of them"
                )
            sae_kwargs["d_sae"] = d_sae
        sae = config_from_dict(sae_kwargs)
        cfg = cls(sae=sae, **own)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Range checks of the optimisation fields (`from_dict` calls this)."""
        positive = {"lr": self.lr, "adam_eps": self.adam_eps, "epochs": self.epochs}
        positive |= {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for key, value in positive.items():
            if not value > 0:
                raise InputError(f"{key} must be > 0, got {value}")
        if self.grad_clip < 0:
            raise InputError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.normalize not in NORMALIZE:
            raise InputError(
                f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}"
            )
        check_schedule(self)
        check_device(self.device)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with flat keys changed (validated like `from_dict`)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})
