"""`monoray train`: train one SAE on a feature set and write metrics, checkpoint and plot.

Every key of the flat training config is a flag (`--mono-coef`, `--k`, `--lr`,
...), generated from `TrainConfig`, so no flag is parsed and then ignored.
`--config FILE` (YAML/JSON, flat keys) sets defaults that flags override; with
`--resume` the checkpoint's config is the base instead.
"""

from __future__ import annotations

import argparse
import math
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def _parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_docs(cls: type) -> dict[str, str]:
    """First line of the docstring under each field of a dataclass (from its source)."""
    import ast
    import inspect
    import itertools
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split()).split(". ")[0].rstrip(".")
    return docs


def _config_flags(parser: argparse.ArgumentParser) -> None:
    import dataclasses

    from monoray.sae import SAEConfig
    from monoray.train.config import TrainConfig

    hints = {**typing.get_type_hints(SAEConfig), **typing.get_type_hints(TrainConfig)}
    group = parser.add_argument_group("training config (flat keys; see TrainConfig / SAEConfig)")
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    defaults |= {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    docs = {**field_docs(SAEConfig), **field_docs(TrainConfig)}
    for key in TrainConfig.allowed_keys():
        if key in CLI_HIDDEN:
            continue
        hint = hints.get(key, float)
        types = [t for t in typing.get_args(hint) or (hint,) if t in (int, float, str, bool)]
        kind = types[0] if types else str
        kwargs: dict[str, Any] = {"dest": key, "default": None, "metavar": key.upper()}
        kwargs["type"] = _parse_bool if kind is bool else kind
        if typing.get_origin(hint) is tuple or tuple in map(
            typing.get_origin, typing.get_args(hint)
        ):
            kwargs["type"] = _parse_int_list
        if key == "arch":
            kwargs["choices"] = _arch_choices()
            kwargs.pop("metavar")
        default = defaults.get(key, dataclasses.MISSING)
        shown = "" if default is dataclasses.MISSING else f" (default: {default})"
        text = HELP.get(key) or docs.get(key) or key.replace("_", " ")
        kwargs["help"] = text.replace("%", "%%") + shown
        group.add_argument(f"--{key.replace('_', '-')}", **kwargs)


def _arch_choices() -> list[str]:
    from monoray.sae import ARCH_NAMES

    return list(ARCH_NAMES)


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
    from monoray.runs.outcome import METRICS_FILE
    from monoray.train.checkpoint import CHECKPOINTS, load_checkpoint
    from monoray.train.config import TrainConfig
    from monoray.train.trainer import PROFILE_FILE, train_sae

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
            flat = dict(ckpt.config)
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
