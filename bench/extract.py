"""Extraction throughput: `monoray extract` vs a plain PyTorch DataLoader loop, same model/images.

Generates an ImageFolder of JPEGs in a temp dir, then times (after a warm-up):

- plain: torchvision `ImageFolder` + the model's own eval transform + `DataLoader`
  + the image tower (autocast float16 on GPU), features L2-normalised and copied
  to host;
- monoray: `extract()` local mode into a feature store (same loader workers, batch
  size, precision);
- with `--ray`: the Ray Data path with 1..N encoder actors (GPU actors when there
  are GPUs), to see the scaling in workers.

Each device (CPU, and CUDA when available) gets its own row. Random-init weights
(throughput does not depend on their values); `--weights PATH` for real ones.
Prints one JSON object. Target: monoray >= 0.9x the plain loop on one device.

    python bench/extract.py --quick          # tiny smoke run (seconds)
    python bench/extract.py                  # ViT-B/32 at 224 px
    python bench/extract.py --ray --ray-workers 1,2,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine


def make_images(root: Path, n: int, size: int = 256, classes: int = 4) -> None:
    """`n` JPEGs of smooth random gradients (decode cost like photos, not like noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, (3, 3))
        img = np.stack([a[k] * xx + b[k] * yy + c[k] * xx * yy for k in range(3)], axis=-1)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


def plain_loop(root: Path, spec: Any, *, batch_size: int, workers: int, device: str) -> float:
    """images/s of the textbook loop: ImageFolder + DataLoader + model."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from monoray.extract.encoders import build_tower, describe_encoder

    info = describe_encoder(spec)
    torch.manual_seed(0)
    model, transform = build_tower(info.entry, info.weights_file, spec.image_size, "cpu")
    model = model.eval().to(device)
    ds = ImageFolder(str(root), transform=transform)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers else None,
    )
    half = device == "cuda"
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=half):
        for x, _ in loader:
            y = model(x.to(device, non_blocking=True)).float()
            y = torch.nn.functional.normalize(y, dim=-1).cpu().numpy()
            n += y.shape[0]
    return n / (time.perf_counter() - t0)


def monoray_run(
    root: Path, out: Path, spec: Any, *, batch_size: int, workers: int, ray: Any = None
) -> float:
    from monoray.extract import ExtractConfig, extract

    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractConfig(
        encoder=spec,
        images=str(root),
        out=out,
        batch_size=batch_size,
        shard_rows=4096,
        loader_workers=workers,
        progress=False,
    )
    return extract(cfg, ray=ray).images_per_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (16 images, 64 px)")
    p.add_argument("--encoder", default="clip-vit-b32")
    p.add_argument("--weights", default="random-init")
    p.add_argument("--images", type=int, help="images per device (default: 128 CPU, 4096 GPU)")
    p.add_argument("--image-size", type=int, help="input size override (default: the model's)")
    p.add_argument("--batch-size", type=int, help="default: 32 CPU, 256 GPU")
    p.add_argument("--workers", type=int, help="loader workers (default: cores - 1, at most 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; best is kept")
    p.add_argument("--ray", action="store_true", help="also time the Ray Data path")
    p.add_argument("--ray-workers", default="1,2", help="encoder actor counts to try with --ray")
    p.add_argument("--cpu-only", action="store_true")
    args = p.parse_args()

    import torch

    from monoray.extract import EncoderSpec
    from monoray.extract.pipeline import default_loader_workers

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    workers = default_loader_workers() if args.workers is None else args.workers
    image_size = 64 if args.quick and args.image_size is None else args.image_size
    report: dict[str, Any] = {"machine": machine(), "encoder": args.encoder, "results": []}
    tmp = Path(tempfile.mkdtemp(prefix="monoray-bench-extract-"))
    try:
        for device in devices:
            n = args.images or (16 if args.quick else 128 if device == "cpu" else 4096)
            bs = args.batch_size or (8 if args.quick else 32 if device == "cpu" else 256)
            root = tmp / f"images-{device}"
            make_images(root, n)
            spec = EncoderSpec(args.encoder, args.weights, image_size=image_size, device=device)
            kw = {"batch_size": bs, "workers": workers}
            # warm-up on a few batches (kernel selection, page cache), then timed runs
            warm = tmp / "warm"
            make_images(warm, min(n, 2 * bs))
            plain_loop(warm, spec, device=device, **kw)
            monoray_run(warm, tmp / "warm-store", spec, **kw)
            plain = max(plain_loop(root, spec, device=device, **kw) for _ in range(args.repeats))
            ours = max(monoray_run(root, tmp / "store", spec, **kw) for _ in range(args.repeats))
            row: dict[str, Any] = {
                "device": device,
                "images": n,
                "image_size": image_size or "model default",
                "batch_size": bs,
                "loader_workers": workers,
                "plain_dataloader_images_per_s": round(plain, 2),
                "monoray_images_per_s": round(ours, 2),
                "ratio": round(ours / plain, 3),
            }
            if args.ray:
                from monoray.extract.distributed import RayOptions

                ray_rows = {}
                for w in [int(x) for x in args.ray_workers.split(",")]:
                    opts = RayOptions(workers=w, gpus_per_worker=1.0 if device == "cuda" else 0.0)
                    ray_rows[str(w)] = round(
                        monoray_run(root, tmp / "store-ray", spec, ray=opts, **kw), 2
                    )
                row["ray_images_per_s_by_workers"] = ray_rows
            report["results"].append(row)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(warm, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
