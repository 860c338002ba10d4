"""`FinetuneModel`: frozen LoRA backbone -> mono layer (Linear + ReLU) -> new classifier.

The mono layer is the paper's extra layer before the head (spec §4): its
post-ReLU output is what MonoLoss and the MonoScore / purity metrics see.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from monoray.finetune.backbones import Backbone


@dataclass(frozen=True, slots=True)
class FinetuneOutput:
    """One forward pass."""

    logits: Tensor
    """[B, n_classes] classifier output."""
    activations: Tensor
    """[B, dim * expansion] post-ReLU output of the mono layer."""


class FinetuneModel(nn.Module):
    """images [B, 3, H, W] -> `FinetuneOutput`. Trainable: LoRA, mono layer, classifier."""

    def __init__(self, backbone: Backbone, n_classes: int, expansion: int = 1) -> None:
        super().__init__()
        self.backbone = backbone.model
        width = backbone.dim * expansion
        self.mono = nn.Sequential(nn.Linear(backbone.dim, width), nn.ReLU())
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, images: Tensor) -> FinetuneOutput:
        activations = self.mono(self.backbone(images))
        return FinetuneOutput(self.classifier(activations), activations)

    def train(self, mode: bool = True) -> FinetuneModel:
        """Train mode for the new layers only: the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_state(self) -> dict[str, Tensor]:
        """The parameters that training changes (LoRA, mono layer, classifier), by name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
