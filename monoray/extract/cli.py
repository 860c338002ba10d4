"""`monoray extract`: images -> frozen encoder -> sharded feature store (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from monoray.configs import add_config_flags
from monoray.data.types import DTYPES
from monoray.extract.distributed import RayOptions
from monoray.extract.encoders import (
    CACHE,
    ENCODERS,
    NORMALISATIONS,
    PRECISIONS,
    RANDOM_INIT,
    EncoderSpec,
)
from monoray.extract.pipeline import ON_BAD_IMAGE, ExtractConfig
from monoray.extract.sources import CIFAR_SPLITS
from monoray.runs.cluster import add_address_arg

SPEC_KEYS = ("image_size", "device", "precision", "normalize", "seed")
"""`EncoderSpec` fields with a flag each (`--encoder` and the weights pair are written out)."""
CONFIG_KEYS = ("split", "image_root", "limit", "batch_size", "shard_rows", "dtype")
CONFIG_KEYS += ("on_bad_image", "loader_workers")
"""`ExtractConfig` fields with a flag each (`--images`, `--out`, `--quiet` are written out)."""
RAY_KEYS = ("workers", "gpus_per_worker", "cpus_per_worker", "decode_tasks")
"""`RayOptions` fields with a flag each (`--address` is `runs.cluster`'s)."""

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
    add_config_flags(
        p,
        (EncoderSpec, ExtractConfig),
        (*CONFIG_KEYS, *SPEC_KEYS),
        choices={
            "split": CIFAR_SPLITS,
            "precision": PRECISIONS,
            "normalize": NORMALISATIONS,
            "dtype": DTYPES,
            "on_bad_image": ON_BAD_IMAGE,
        },
        aliases={"normalize": ("--normalise",)},
    )
    ray = p.add_argument_group("Ray Data (distributed)")
    ray.add_argument("--ray", action="store_true", help="run on Ray (a local one if no --address)")
    add_address_arg(ray)
    add_config_flags(ray, (RayOptions,), RAY_KEYS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The flags of `keys` that were given (the dataclass defaults stand for the rest)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def run(args: argparse.Namespace) -> int:
    from monoray.extract.pipeline import extract

    spec = EncoderSpec(
        name=args.encoder,
        weights=RANDOM_INIT if args.random_init else args.weights,
        **_given(args, SPEC_KEYS),
    )
    cfg = ExtractConfig(
        encoder=spec,
        images=args.images,
        out=args.out,
        progress=not args.quiet,
        **_given(args, CONFIG_KEYS),
    )
    ray = None
    if args.ray or args.address:
        ray = RayOptions(address=args.address, **_given(args, RAY_KEYS))
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
