"""`FinetuneConfig`: one finetuning run (backbone, data, MonoLoss, optimisation) as a frozen record.

Like `monoray.train.TrainConfig`, the config travels flat (`{"backbone": "resnet50",
"mono_coef": 0.05, "lr": 0.1, ...}`): that is what the CLI, YAML search spaces,
Ray Tune, Train workers and checkpoints hold. `from_dict` rejects unknown keys
and bad values with one `InputError`; `to_dict` is its inverse. Defaults follow
the paper's CIFAR recipe (spec §7, App. E) where one applies.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from monoray.configs import coerce, reject_unknown_keys
from monoray.errors import InputError
from monoray.runs.device import check_device

SCHEDULES = ("cosine", "constant")
"""Learning-rate schedules: cosine decay to 0 over the run (after warm-up), or constant."""
AUGMENTATIONS = ("imagenet", "cifar", "none")
"""Augmentation presets (see `monoray.finetune.data`)."""
DATA_KEYS = ("images", "embeddings", "subset")
"""Keys a sweep takes from its space's `data` section, not from `fixed` / `search`."""


@dataclass(frozen=True, slots=True)
class FinetuneConfig:
    """One finetuning run: LoRA on a frozen backbone, a mono layer, a new classifier."""

    backbone: str = "resnet50"
    """Registry name of the backbone: "resnet50" or "clip-vit-b32"."""
    images: str = "digits"
    """Training images: "digits", a CIFAR-10/100 python directory or an ImageFolder root."""
    embeddings: str = ""
    """CLIP-ViT-B/32 embeddings of `images` from `monoray extract` (a store, or a dir with
    `train/` and `val/` stores)."""
    weights: str | None = None
    """Pretrained backbone weights: a local file, or "cache" (offline timm/HF cache)."""
    random_init: bool = False
    """Randomly initialised backbone (tests, smoke runs); must be asked for explicitly."""
    image_size: int = 224
    """Input resolution in pixels (square)."""
    augment: str = "cifar"
    """Augmentation preset: "imagenet", "cifar" or "none"."""
    subset: int | None = None
    """Use only the first N samples of each split (smoke runs, dry runs)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    expansion: int = 1
    """Width of the mono layer as a multiple of the backbone's feature width."""
    mono_coef: float = 0.0
    """MonoLoss weight λ (0 = cross entropy only)."""
    mono_eps: float = 1e-6
    """Floor on the normalised batch denominator of MonoLoss (see `monoray.metrics.mono_loss`)."""
    lr: float = 0.1
    """Peak SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 2e-5
    """SGD weight decay (on the trainable parameters)."""
    schedule: str = "cosine"
    """Learning-rate schedule: "cosine" (per step, after warm-up) or "constant"."""
    warmup_epochs: int = 0
    """Epochs of linear warm-up from 0 to `lr`."""
    epochs: int = 90
    """Passes over the training split."""
    batch_size: int = 1024
    """Global batch size in images (split across workers)."""
    eval_batch_size: int = 256
    """Images per forward pass in validation, per worker (results do not depend on it)."""
    seed: int = 42
    """Seeds the new layers, LoRA init, shuffling and augmentation."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda" (each Train worker uses its own GPU)."""
    loader_workers: int = 0
    """DataLoader worker processes per training process (0: decode inline)."""

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        """Every flat key `from_dict` accepts."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every field."""
        return {k: getattr(self, k) for k in self.allowed_keys()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Build from flat keys (None = default); any problem is one `InputError` naming the key."""
        reject_unknown_keys(d, cls.allowed_keys(), "finetune config")
        hints = typing.get_type_hints(cls)
        kwargs = {k: coerce(k, v, hints[k]) for k, v in d.items() if v is not None}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Range and choice checks (`from_dict` calls this)."""
        from monoray.finetune.backbones import BACKBONES

        if self.backbone not in BACKBONES:
            raise InputError(
                f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        if self.random_init == (self.weights is not None):
            raise InputError(
                "give exactly one of weights (a local file or 'cache') and random_init "
                "(--weights PATH or --random-init)"
            )
        if not self.embeddings:
            raise InputError(
                "embeddings: a CLIP-ViT-B/32 embedding store of the images is required "
                "(make one with `monoray extract --encoder clip-vit-b32 ...`)"
            )
        positive = {
            "image_size": self.image_size,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "expansion": self.expansion,
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
        }
        for key, value in positive.items():
            if not value > 0:
                raise InputError(f"{key} must be > 0, got {value}")
        non_negative = {
            "mono_coef": self.mono_coef,
            "mono_eps": self.mono_eps,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "loader_workers": self.loader_workers,
        }
        for key, value in non_negative.items():
            if not value >= 0:
                raise InputError(f"{key} must be >= 0, got {value}")
        if self.image_size < 16:
            raise InputError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.subset is not None and self.subset < 2:
            raise InputError(f"subset must be >= 2, got {self.subset}")
        for key, value, options in (
            ("schedule", self.schedule, SCHEDULES),
            ("augment", self.augment, AUGMENTATIONS),
        ):
            if value not in options:
                raise InputError(f"{key} must be one of {', '.join(options)}, got {value!r}")
        check_device(self.device)

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with flat keys changed (validated like `from_dict`)."""
        return FinetuneConfig.from_dict({**self.to_dict(), **changes})
