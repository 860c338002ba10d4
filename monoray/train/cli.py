"""`monoray train`: train one SAE on a feature set and write metrics, checkpoint and plot.

Every key of the flat training config is a flag (`--mono-coef`, `--k`, `--lr`,
...), generated from `TrainConfig`, so no flag is parsed and then ignored.
`--config FILE` (YAML/JSON, flat keys) sets defaults that flags override; with
`--resume` the checkpoint's config is the base instead.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monoray.configs import add_config_flags
from monoray.errors import InputError
from monoray.runs.cluster import add_address_arg

if TYPE_CHECKING:
    from monoray.data import FeatureSplits

HELP = {
    "arch": "SAE architecture",
    "d_in": "feature width (default: the data's)",
    "d_sae": "number of latents",
    "expansion": "d_sae = expansion * d_in (instead of --d-sae)",
    "k": "active latents per sample (TopK family)",
    "mono_coef": "MonoLoss weight λ (0 = off)",
    "epochs": "passes over the train split",
    "batch_size": "training batch size",
    "lr": "Adam learning rate",
    "seed": "seed of init, shuffling and sampling",
    "device": "auto (CUDA if present), cpu, cuda, cuda:N",
    "normalize": "input normalisation: unit or none",
}


CLI_HIDDEN = ("schema_version",)
"""Config keys that are records, not settings: no flag for them."""


def _config_flags(parser: argparse.ArgumentParser) -> None:
    from monoray.sae import ARCH_NAMES, SAEConfig
    from monoray.train.config import TrainConfig

    group = parser.add_argument_group("training config (flat keys; see TrainConfig / SAEConfig)")
    keys = [k for k in TrainConfig.allowed_keys() if k not in CLI_HIDDEN]
    add_config_flags(group, (SAEConfig, TrainConfig), keys, help=HELP, choices={"arch": ARCH_NAMES})


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one SAE (writes metrics.json, a checkpoint and the MonoScore profile)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--features",
        default=None,
        metavar="PATH|digits",
        help="'digits' (built in), a .npz with 'features' [N, d] (+ 'labels'), or a feature-store dir (default: digits)",
    )
    parser.add_argument(
        "--val-features",
        default=None,
        metavar="PATH",
        help="separate val split (else 80/20 by --split-seed)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/val split (default 0)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="val share when splitting (default 0.2)"
    )
    from monoray.data.types import ZERO_ROWS

    parser.add_argument(
        "--zero-rows",
        default=None,
        choices=ZERO_ROWS,
        help="all-zero feature rows: keep (similarity 0 with every sample, the paper's code), "
        "drop, or error (default: keep)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in DIR"
    )
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="YAML/JSON of flat config keys"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="W",
        help="Ray Train workers sharing each batch (same result as one process); 0/1: in-process",
    )
    parser.add_argument(
        "--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per worker (NCCL)"
    )
    add_address_arg(parser)
    _config_flags(parser)
    parser.set_defaults(run=run)


def read_config_file(path: Path) -> dict[str, Any]:
    """Flat config keys from a YAML or JSON mapping."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the config ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_report(name: str, splits: FeatureSplits) -> str:
    """One line: what was loaded (sizes, width, all-zero rows)."""
    zero = splits.zero_rows.describe() if splits.zero_rows is not None else ""
    return (
        f"{name}: {len(splits.train)} train / {len(splits.val)} val samples, "
        f"d {splits.train.dim}; {zero}"
    )


def run(args: argparse.Namespace) -> int:
    from monoray.data import load_features
    from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint
    from monoray.runs.outcome import METRICS_FILE, PROFILE_FILE
    from monoray.train.config import TrainConfig
    from monoray.train.trainer import train_sae

    flat: dict[str, Any] = {}
    data: dict[str, Any] = {
        "features": "digits",
        "val_features": None,
        "seed": 0,
        "val_fraction": 0.2,
        "zero_rows": "keep",
    }
    if args.resume:
        ckpt = load_checkpoint(args.out / CHECKPOINTS, with_optimizer=False)
        if ckpt is not None:
            from monoray.sae import drop_unused

            flat = drop_unused(ckpt.config)
            data = {**data, **(ckpt.data or {})}
    if args.config is not None:
        flat.update(read_config_file(args.config))
    given = {k: getattr(args, k, None) for k in TrainConfig.allowed_keys()}
    flat.update({k: v for k, v in given.items() if v is not None})
    if args.features is not None:
        data |= {"features": args.features, "val_features": args.val_features}
        data |= {"seed": args.split_seed, "val_fraction": args.val_fraction}
    elif args.val_features is not None:
        raise InputError("--val-features needs --features")
    if args.zero_rows is not None:
        data["zero_rows"] = args.zero_rows

    if "arch" not in flat:
        from monoray.sae import ARCH_NAMES

        raise InputError(f"--arch is required (one of {', '.join(ARCH_NAMES)})")
    splits = load_features(
        data["features"],
        val_source=data["val_features"],
        seed=data["seed"],
        val_fraction=data["val_fraction"],
        d_in=flat.get("d_in"),
        zero_rows=data["zero_rows"],
    )
    print(load_report(data["features"], splits))
    flat.setdefault("d_in", splits.train.dim)
    if getattr(args, "expansion", None) is not None and args.d_sae is None:
        flat.pop("d_sae")  # --expansion on the command line beats the base config's d_sae
    cfg = TrainConfig.from_dict(flat)
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    if args.workers >= 2:
        from monoray.train.workers import run_workers

        metrics = run_workers(cfg, data, splits, args)
    else:
        metrics = train_sae(
            cfg,
            splits,
            out_dir=args.out,
            resume=args.resume,
            progress=False if args.no_progress else None,
        )
    keys = ("r2", "explained_variance", "l0", "dead_fraction", "monoscore_mean")
    keys += ("monoscore_mean_active", "monoscore_median", "purity_binary", "purity_weighted")
    width = max(map(len, keys))
    print(f"{cfg.sae.arch} d_sae={cfg.sae.d_sae} epochs={cfg.epochs} -> {args.out}")
    for k in keys:
        if math.isfinite(metrics.get(k, math.nan)):  # purity without labels means nothing
            print(f"  {k:<{width}}  {metrics[k]:.4f}")
    print(f"wrote {args.out / METRICS_FILE}, {args.out / PROFILE_FILE}, {args.out / CHECKPOINTS}/")
    return 0
