"""Per-step cost of MonoLoss in finetuning: λ = 0 vs λ > 0, same model, same batch.

    python bench/finetune_overhead.py                       # both backbones, sizes by device
    python bench/finetune_overhead.py --backbone resnet50 --batch 256 --image-size 224
    python bench/finetune_overhead.py --quick               # tiny sizes, a smoke test

A step is what `monoray.finetune.train_finetune` does per batch: forward of the
LoRA backbone + mono layer + classifier, `step_loss` (cross entropy, plus the
global-batch MonoLoss when λ > 0), backward, SGD. Backbones are randomly
initialised (timing does not depend on the weights). The two variants run
interleaved, one step each per round, so background load hits them alike.
Prints one JSON object with the machine, the sizes and, per backbone, the
overhead ratio step(λ > 0) / step(λ = 0) from the fastest step of each variant
(other jobs on a shared box only ever add time) and from the medians, and the
MonoLoss term alone (forward + backward on the step's activations) over the
λ = 0 step: the overhead with the noise of two full steps taken out (the λ > 0
step adds this work and one gradient addition). `meets_target` is `1 + mono_alone_over_step
<= 1.02` (the paper reports +0.4-0.8 % per ImageNet epoch on GPU); on a loaded
CPU box the full-step ratios scatter by more than the target either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine

from monoray.finetune.backbones import BACKBONES
from monoray.finetune.config import FinetuneConfig
from monoray.finetune.loop import World, build_model, step_loss
from monoray.metrics.distributed_loss import mono_loss_global

TARGET_RATIO = 1.02
EMBEDDING_DIM = 512
"""Width of the similarity embeddings (CLIP-ViT-B/32)."""
N_CLASSES = 1000
GPU_SIZES = {"batch": 256, "image_size": 224}
CPU_SIZES = {"batch": 32, "image_size": 64}
QUICK_SIZES = {"batch": 8, "image_size": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_backbone(
    name: str, *, batch: int, image_size: int, rounds: int, device: torch.device
) -> dict[str, Any]:
    cfg = FinetuneConfig.from_dict(
        {"backbone": name, "embeddings": "-", "random_init": True, "image_size": image_size}
    )
    model, _, _ = build_model(cfg, N_CLASSES)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    emb = torch.randn(batch, EMBEDDING_DIM, generator=g).to(device)
    variants = {"ce": cfg.replace(mono_coef=0.0), "ce_mono": cfg.replace(mono_coef=0.05)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):  # round 0 warms up (allocator, kernels)
        for key, c in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            step_loss(model, x, y, emb, c, World(0, 1), batch).backward.backward()
            opt.step()
            _sync(device)
            if r:
                times[key].append(time.perf_counter() - t0)
    with torch.no_grad():
        acts = model(x).activations
    alone = []
    for _ in range(3 * rounds):  # the MonoLoss term by itself: forward + backward
        a = acts.clone().requires_grad_()
        _sync(device)
        t0 = time.perf_counter()
        mono_loss_global(emb, a, eps=cfg.mono_eps).backward()
        _sync(device)
        alone.append(time.perf_counter() - t0)
    ce, mono = times["ce"], times["ce_mono"]
    ratio_min = min(mono) / min(ce)
    return {
        "mono_width": model.classifier.in_features,
        "overhead_ratio": round(ratio_min, 4),
        "overhead_ratio_median": round(statistics.median(mono) / statistics.median(ce), 4),
        "mono_alone_over_step": round(min(alone) / min(ce), 4),
        "meets_target": 1 + min(alone) / min(ce) <= TARGET_RATIO,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=[*BACKBONES, "all"], default="all")
    p.add_argument("--batch", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = QUICK_SIZES if args.quick else GPU_SIZES if device.type == "cuda" else CPU_SIZES
    batch = args.batch or sizes["batch"]
    image_size = args.image_size or sizes["image_size"]
    names = list(BACKBONES) if args.backbone == "all" else [args.backbone]
    results = {
        name: bench_backbone(
            name, batch=batch, image_size=image_size, rounds=args.rounds, device=device
        )
        for name in names
    }
    out = {
        "bench": "finetune_overhead",
        "machine": machine(),
        "device": str(device),
        "batch": batch,
        "image_size": image_size,
        "rounds": args.rounds,
        "target_ratio_max": TARGET_RATIO,
        "results": results,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
