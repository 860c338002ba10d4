"""Backbones for finetuning: a small registry of timm models, LoRA-wrapped, frozen otherwise.

- `resnet50` (timm `resnet50`, weights tag `tv_in1k`: torchvision's ImageNet
  weights). ResNet-50 has no attention, so there are no query/value
  projections; LoRA (r=16, alpha=32) goes on the 3x3 convolution (`conv2`) of
  every bottleneck block (16 blocks), through peft's Conv2d LoRA. The frozen
  backbone runs in eval mode: BatchNorm uses its running statistics and never
  updates them (frozen means frozen, and a batch split across W workers then
  gives exactly the single-process result).
- `clip-vit-b32` (timm `vit_base_patch32_clip_quickgelu_224`, tag `openai`:
  the OpenAI CLIP image tower with QuickGELU; timm converts open_clip / OpenAI
  state dicts on load). timm fuses q, k and v into one `qkv` Linear; each is
  replaced by `SplitQKV`, three Linears holding the same rows of the fused
  weight whose concatenated outputs equal the fused output, so LoRA can target
  `q` and `v` only (r=16, alpha=32 on every block, as the paper does).

Weights come from a local file (`.safetensors`, or `.pth`/`.pt`/`.bin` read by
timm with `torch.load(weights_only=True)`), or "cache" (the tag's file in an
existing Hugging Face cache, looked up offline); random init must be asked for.
Nothing downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from monoray.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""Weight file types accepted as `weights`."""
CACHE = "cache"
"""`weights` value: the backbone's pretrained tag from a local Hugging Face cache (offline)."""


@dataclass(frozen=True, slots=True)
class BackboneEntry:
    """One registered backbone."""

    name: str
    """Registry name (`FinetuneConfig.backbone`)."""
    arch: str
    """timm architecture."""
    tag: str
    """timm pretrained tag (preprocessing constants and cached weights)."""
    lora_targets: str
    """Regex (peft `target_modules`) of the modules that get LoRA."""
    description: str
    """One line for `--help`."""


BACKBONES: dict[str, BackboneEntry] = {
    e.name: e
    for e in (
        BackboneEntry(
            "resnet50",
            "resnet50",
            "tv_in1k",
            r"layer\d+\.\d+\.conv2",
            "ResNet-50 (torchvision ImageNet weights); LoRA on every bottleneck's 3x3 conv",
        ),
        BackboneEntry(
            "clip-vit-b32",
            "vit_base_patch32_clip_quickgelu_224",
            "openai",
            r"blocks\.\d+\.attn\.qkv\.(q|v)",
            "CLIP-ViT-B/32 image tower (OpenAI); LoRA on every block's query and value",
        ),
    )
}


class SplitQKV(nn.Module):
    """A fused `qkv` Linear (d -> 3d) as three Linears `q`, `k`, `v` (same weights, same output)."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        d_in, d_out = fused.in_features, fused.out_features // 3
        bias = fused.bias is not None
        self.q, self.k, self.v = (nn.Linear(d_in, d_out, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, part in enumerate((self.q, self.k, self.v)):
                part.weight.copy_(fused.weight[i * d_out : (i + 1) * d_out])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * d_out : (i + 1) * d_out])
        self.to(device=fused.weight.device, dtype=fused.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model: nn.Module) -> int:
    """Replace every `attn.qkv` Linear of a timm ViT by `SplitQKV`; returns how many."""
    count = 0
    for block in getattr(model, "blocks", ()):
        attn = block.attn
        if isinstance(attn.qkv, nn.Linear):
            attn.qkv = SplitQKV(attn.qkv)
            count += 1
    return count


@dataclass(frozen=True, slots=True)
class Backbone:
    """A LoRA-wrapped frozen backbone and what the data pipeline needs to know about it."""

    model: nn.Module
    """images [B, 3, H, W] -> features [B, dim]; only the LoRA parameters require grad."""
    dim: int
    """Feature width."""
    mean: tuple[float, float, float]
    """Per-channel mean of its pretrained preprocessing."""
    std: tuple[float, float, float]
    """Per-channel std of its pretrained preprocessing."""
    weights_id: str
    """"random-init" or the weight file's name: recorded with checkpoints."""


def resolve_weights(entry: BackboneEntry, weights: str | None) -> Path | None:
    """The local weight file `weights` names (None: random init); `InputError` if there is none."""
    if weights is None:
        return None
    if weights == CACHE:
        return _from_hf_cache(entry)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InputError(
            f"{weights}: weight file not found (pass a local file, '{CACHE}' for the offline "
            "Hugging Face cache, or --random-init)"
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InputError(f"{path}: weight files must end in {', '.join(WEIGHT_SUFFIXES)}")
    return path.resolve()


def _from_hf_cache(entry: BackboneEntry) -> Path:
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(f"{entry.arch}.{entry.tag}")
    repo = (cfg.hf_hub_id or "") if cfg is not None else ""
    names = [cfg.hf_hub_filename] if cfg is not None and cfg.hf_hub_filename else []
    for name in [*names, "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(repo, name) if repo else None
        if isinstance(found, str):
            return Path(found)
    raise InputError(
        f"weights of {entry.name} ({repo or entry.arch + '.' + entry.tag}) are not in the local "
        "Hugging Face cache (monoray never downloads); pass --weights PATH or --random-init"
    )


def build_backbone(
    name: str,
    *,
    weights: str | None,
    image_size: int,
    lora_r: int,
    lora_alpha: float,
) -> Backbone:
    """Build `name` with its weights (random from the global torch RNG when None), then LoRA.

    Every parameter but LoRA's is frozen; the backbone is put in eval mode and
    `FinetuneModel.train()` keeps it there.
    """
    import timm
    from peft import LoraConfig, get_peft_model

    entry = BACKBONES[name]
    file = resolve_weights(entry, weights)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if entry.arch.startswith("vit"):
        kwargs["img_size"] = image_size
    elif file is None:
        # timm zero-initialises each bottleneck's last BN scale: with random weights the
        # residual branches (and the LoRA on their convs) would get no gradient at all.
        kwargs["zero_init_last"] = False
    full = f"{entry.arch}.{entry.tag}"
    try:
        if file is None:
            model = timm.create_model(full, pretrained=False, **kwargs)
        else:
            model = timm.create_model(
                full, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs
            )
    except Exception as err:
        if file is None:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{file}: cannot load weights for {name}: {first[:300]}") from None
    data_cfg = timm.data.resolve_model_data_config(model)
    split_qkv(model)
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=entry.lora_targets,
        lora_dropout=0.0,
        bias="none",
    )
    wrapped = get_peft_model(model, lora)
    wrapped.eval()
    mean = tuple(float(v) for v in data_cfg["mean"])
    std = tuple(float(v) for v in data_cfg["std"])
    return Backbone(
        model=wrapped,
        dim=int(model.num_features),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        weights_id="random-init" if file is None else file.name,
    )
