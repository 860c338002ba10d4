"""`monoray extract`: images -> frozen encoder -> sharded feature store (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monoray.extract.encoders import CACHE, ENCODERS, NORMALISATIONS, PRECISIONS, RANDOM_INIT
from monoray.runs.cluster import add_address_arg

EPILOG = "encoders:\n" + "\n".join(f"  {e.name:22s} {e.description}" for e in ENCODERS.values())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="extract image features with a frozen encoder into a feature store",
        description=(
            "Encode images with a frozen CLIP / SigLIP2 / ViT / DINOv2 image tower and write a "
            "sharded feature store (resumable: rerun the same command after a crash). "
            "Runs in this process by default; --ray or --address uses Ray Data."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--encoder", required=True, choices=list(ENCODERS), metavar="NAME", help="see below"
    )
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--weights",
        metavar="PATH",
        help=f"local weight file (.safetensors/.bin/.pt/.pth/.npz), or '{CACHE}' for the "
        "encoder's weights from an existing Hugging Face cache (offline, never downloads)",
    )
    weights.add_argument(
        "--random-init", action="store_true", help="random weights (tests and smoke runs)"
    )
    p.add_argument(
        "--images",
        required=True,
        metavar="SRC",
        help="'digits', an ImageFolder (or flat) image folder, a CIFAR python directory, "
        "or a .csv/.parquet list with a path column and optional label column",
    )
    p.add_argument("--out", required=True, type=Path, metavar="STORE", help="store directory")
    p.add_argument("--split", choices=["train", "test"], help="CIFAR split (default: train)")
    p.add_argument(
        "--image-root", metavar="DIR", help="base folder of relative paths in a .csv/.parquet list"
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the listing")
    p.add_argument(
        "--image-size", type=int, metavar="PX", help="input resolution override in pixels"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (local mode)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument(
        "--normalize",
        "--normalise",  # the old spelling; `train --normalize` is the one documented
        dest="normalise",
        default="unit",
        choices=NORMALISATIONS,
        help="unit: L2-normalise features (default)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of --random-init")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="default 64")
    p.add_argument(
        "--shard-rows", type=int, default=16384, metavar="N", help="images per shard (resume unit)"
    )
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument(
        "--on-bad-image",
        default="skip",
        choices=["skip", "fail"],
        help="skip: list unreadable images in STORE/bad_images.jsonl and go on (default)",
    )
    p.add_argument("--loader-workers", type=int, metavar="N", help="decode processes in local mode")
    ray = p.add_argument_group("Ray Data (distributed)")
    ray.add_argument("--ray", action="store_true", help="run on Ray (a local one if no --address)")
    add_address_arg(ray)
    ray.add_argument(
        "--workers", type=int, default=1, metavar="N", help="encoder actors (default 1)"
    )
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="default: 1 if the cluster has GPUs, else 0",
    )
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C")
    ray.add_argument(
        "--decode-tasks", type=int, metavar="N", help="most concurrent decode tasks (default: CPUs)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from monoray.extract.distributed import RayOptions
    from monoray.extract.encoders import EncoderSpec
    from monoray.extract.pipeline import ExtractConfig, extract

    spec = EncoderSpec(
        name=args.encoder,
        weights=RANDOM_INIT if args.random_init else args.weights,
        image_size=args.image_size,
        device=args.device,
        precision=args.precision,
        normalise=args.normalise,
        seed=args.seed,
    )
    cfg = ExtractConfig(
        encoder=spec,
        images=args.images,
        out=args.out,
        split=args.split,
        image_root=args.image_root,
        limit=args.limit,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        dtype=args.dtype,
        on_bad_image=args.on_bad_image,
        loader_workers=args.loader_workers,
        progress=not args.quiet,
    )
    ray = None
    if args.ray or args.address:
        ray = RayOptions(
            address=args.address,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            decode_tasks=args.decode_tasks,
        )
    r = extract(cfg, ray=ray)
    h = r.header
    print(
        f"{r.path}: {h.n_samples} samples of {h.encoder} (dim {h.dim}, {h.dtype}, "
        f"normalisation {h.normalisation})"
    )
    print(
        f"this run: {r.n_written} encoded in {r.seconds:.1f} s ({r.images_per_s:.1f} images/s); "
        f"{r.n_resumed} kept from finished shards"
    )
    if r.n_bad:
        print(f"{r.n_bad} unreadable images skipped, listed in {r.bad_images}", file=sys.stderr)
    return 0
