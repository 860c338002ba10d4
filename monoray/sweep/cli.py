"""`monoray sweep SPACE.yaml`: run (or resume, or dry-run) a search space."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from monoray.runs.cluster import add_address_arg

if TYPE_CHECKING:
    from monoray.sweep.runner import SweepResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a Ray Tune + Optuna sweep of a search-space YAML",
        description="Run a multi-objective sweep (Ray Tune + Optuna), recorded in MLflow.",
    )
    p.add_argument("space", type=Path, help="search-space YAML (see search_spaces/demo.yaml)")
    p.add_argument("--name", help="sweep name (default: the space's name); one study per name")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    add_address_arg(p)
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI: sqlite, postgresql or an http(s) MLflow server "
        "(default: <root>/mlflow.db)",
    )
    p.add_argument(
        "--storage",
        help="Optuna RDB URL: sqlite or postgresql, e.g. postgresql://user@db/optuna "
        "(default: <root>/optuna.db)",
    )
    p.add_argument("--root", help="project directory (default: ./monoray-runs or $MONORAY_HOME)")
    p.add_argument("--num-samples", type=int, help="override budget.num_samples")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a space key, e.g. --set fixed.epochs=2 (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, then run 2 one-epoch trials on a data subset in a throwaway study",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from monoray.errors import InputError
    from monoray.sweep.runner import SweepOptions, run_sweep
    from monoray.sweep.space import load_space

    overrides = list(args.overrides)
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise InputError(f"--num-samples: expected an integer >= 1, got {args.num_samples}")
        overrides.append(f"budget.num_samples={args.num_samples}")
    space = load_space(args.space, overrides)
    # Shared backends (PostgreSQL, an MLflow server): unreachable is one line, before anything runs.
    if args.storage:
        from monoray.sweep.search import storage_for

        storage_for(args.storage).remove_session()
    if args.tracking_uri:
        from monoray.sweep.tracking import check_tracking_uri

        check_tracking_uri(args.tracking_uri)
    opts = SweepOptions(
        name=args.name,
        resume=args.resume,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        root=args.root,
        dry_run=args.dry_run,
        progress=not args.quiet,
    )
    result = run_sweep(space, opts)
    out = sys.stdout
    if result.interrupted:
        print(
            f"sweep {result.name} interrupted; continue with: "
            f"monoray sweep {args.space} --name {result.name} --resume",
            file=sys.stderr,
        )
        return 130
    print(
        f"\nsweep {result.name}: {result.n_complete} trials complete, {result.n_failed} failed"
        + (f", {result.n_pruned} stopped early" if result.n_pruned else "")
        + f" in {result.fit_s + result.publish_s:.0f} s",
        file=out,
    )
    if result.pareto is not None:
        print(f"Pareto front ({' vs '.join(result.pareto.metrics)}):", file=out)
        print(result.pareto.table(), file=out)
        print(f"all columns: {result.pareto.csv_path}", file=out)
    if result.pack_sizing is not None:
        print(result.pack_sizing, file=out)
    if args.dry_run:
        print("dry run passed: the space, data and resources work on this machine", file=out)
    else:
        print("\n".join(printed_links(result, args)), file=out)
    return 0


def printed_links(result: SweepResult, args: argparse.Namespace) -> list[str]:
    """The experiment and parent run links, and what serves them."""
    from monoray.sweep.links import SERVER_SCHEMES, sweep_links, ui_base
    from monoray.sweep.search import redact

    uri = result.tracking_uri
    lines = sweep_links(ui_base(uri), result.experiment_id, result.parent_run_id).lines()
    if args.tracking_uri is None:
        ui = "monoray ui" + (f" --root {args.root}" if args.root else "")
        lines.append(f"(serve them with: {ui}, or make ui)")
    elif uri.partition(":")[0] not in SERVER_SCHEMES:
        lines.append(f"(serve them with an MLflow UI over {redact(uri)})")
    return lines
