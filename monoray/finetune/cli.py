"""`monoray finetune`: one finetuning run (LoRA backbone + mono layer + MonoLoss), local or on Ray Train.

Every key of `FinetuneConfig` is a flag (`--backbone`, `--mono-coef`, `--lr`,
...), generated from the dataclass, so no flag is parsed and then ignored.
`--workers 0` (default) trains in this process; `--workers N` runs N Ray Train
workers (gloo on CPU, NCCL with `--gpus-per-worker 1`) on a local Ray, or the
cluster at `--address`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from monoray.configs import add_config_flags
from monoray.finetune.backbones import CACHE
from monoray.finetune.config import FinetuneConfig
from monoray.finetune.data import DIGITS
from monoray.runs.cluster import add_address_arg

OWN_FLAGS = ("weights", "random_init")
"""Config keys with hand-written flags (a mutually exclusive pair)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from monoray.finetune.backbones import BACKBONES

    p = sub.add_parser(
        "finetune",
        help="finetune ResNet-50 / CLIP-ViT-B/32 (LoRA) with MonoLoss: one run",
        description=__doc__.splitlines()[0],
        epilog="backbones:\n"
        + "\n".join(f"  {e.name:14s} {e.description}" for e in BACKBONES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--weights",
        metavar="PATH",
        help="local backbone weights (.safetensors/.pth/.pt/.bin), or 'cache' for the offline "
        "Hugging Face cache (never downloads)",
    )
    weights.add_argument(
        "--random-init", action="store_true", help="random backbone weights (tests, smoke runs)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--workers", type=int, default=0, help="Ray Train workers (0: train in this process)"
    )
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per Train worker (NCCL if > 0)"
    )
    add_address_arg(p)
    group = p.add_argument_group("finetune config (see FinetuneConfig)")
    keys = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in OWN_FLAGS]
    add_config_flags(group, (FinetuneConfig,), keys, choices={"backbone": list(BACKBONES)})
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The run's config: every given flag, defaults for the rest."""
    flat = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(FinetuneConfig)
        if f.name not in OWN_FLAGS
    }
    flat["weights"] = args.weights
    flat["random_init"] = bool(args.random_init)
    # Absolute paths: Ray Train workers run in their own working directories.
    for key, keep in (("weights", CACHE), ("images", DIGITS), ("embeddings", None)):
        if flat[key] is not None and flat[key] != keep:
            flat[key] = str(Path(flat[key]).expanduser().resolve())
    return FinetuneConfig.from_dict(flat)


def run(args: argparse.Namespace) -> int:
    from monoray.errors import InputError
    from monoray.finetune.backbones import BACKBONES, resolve_weights
    from monoray.finetune.data import open_finetune_data

    cfg = config_from_args(args)
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    # Fail fast, before any model or worker starts: weights, then data.
    resolve_weights(BACKBONES[cfg.backbone], cfg.weights)
    open_finetune_data(cfg.images, cfg.embeddings, subset=cfg.subset)
    out: Path = args.out.resolve()
    if args.workers == 0:
        metrics = _local(cfg, out, resume=args.resume)
    else:
        metrics = _distributed(cfg, out, args)
    shown = ("accuracy", "top5", "monoscore_mean", "purity_binary", "train_loss")
    summary = {k: round(float(metrics[k]), 4) for k in shown if k in metrics}
    print(json.dumps(summary), file=sys.stdout)
    return 0


def _local(cfg: FinetuneConfig, out: Path, *, resume: bool) -> dict[str, float]:
    from monoray.finetune.loop import train_finetune
    from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint

    resume_from = None
    if resume and load_checkpoint(out / CHECKPOINTS, with_optimizer=False) is not None:
        resume_from = out / CHECKPOINTS

    def on_epoch(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        print(
            f"epoch {epoch}: accuracy {metrics['accuracy']:.4f} "
            f"monoscore {metrics['monoscore_mean']:.4f} loss {metrics['train_loss']:.4f}",
            file=sys.stderr,
        )

    return train_finetune(cfg, out_dir=out, resume_from=resume_from, on_epoch=on_epoch)


def _distributed(cfg: FinetuneConfig, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train on `args.workers` Ray Train workers with Train's storage in `out`.

    Ray Train keeps its checkpoints (and its run state) at `out/checkpoints/`
    (`RunConfig(storage_path=out, name=CHECKPOINTS)`), the in-process layout;
    the driver writes `out/metrics.json` from the final checkpoint's history,
    the same dict an in-process run writes.
    """
    from ray.train import TrainingFailedError

    from monoray.errors import InputError
    from monoray.finetune.trial import fit_distributed
    from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint
    from monoray.runs.cluster import start_ray
    from monoray.runs.outcome import RunFailedError, check_outcome, write_metrics

    previous = load_checkpoint(out / CHECKPOINTS, with_optimizer=False)
    if not args.resume and previous is not None:
        raise InputError(f"{out}/: holds a run already; pass --resume to continue it")
    # Ray's notice that token auth is on (it stays on) would be a second stderr line of every run.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    start_ray(args.address)
    try:
        result = fit_distributed(
            cfg,
            workers=args.workers,
            storage_path=out,
            name=CHECKPOINTS,
            gpu_per_worker=args.gpus_per_worker,
            status_dir=out / "workers",
            # Train restores its own runs from out/checkpoints; this continues an in-process one.
            resume_from=None if previous is None else previous.path,
        )
        failure, error = result.return_value, result.error
    except TrainingFailedError as err:
        failure, error = None, err
    check_outcome(failure, error)
    final = load_checkpoint(out / CHECKPOINTS, with_optimizer=False)
    if final is None:
        raise RunFailedError("the workers finished without a checkpoint")
    write_metrics(out, final.history[-1])
    return final.history[-1]
