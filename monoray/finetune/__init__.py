"""Finetuning vision backbones with MonoLoss (paper §4.2, spec §4 and §7).

A frozen ResNet-50 or CLIP-ViT-B/32 with LoRA (r=16, alpha=32), an inserted
mono layer (Linear + ReLU) whose activations MonoLoss sees, and a new
classifier; one loop (`train_finetune`) for `monoray finetune`, Tune trials and
Ray Train workers. See docs/finetune.md.
"""

from monoray.finetune.backbones import BACKBONES, build_backbone
from monoray.finetune.config import FinetuneConfig
from monoray.finetune.data import FinetuneData, open_finetune_data
from monoray.finetune.loop import train_finetune
from monoray.finetune.model import FinetuneModel

__all__ = [
    "BACKBONES",
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneModel",
    "build_backbone",
    "open_finetune_data",
    "train_finetune",
]
