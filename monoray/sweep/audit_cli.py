"""`monoray audit SWEEP`: check that a sweep's study, MLflow runs and checkpoints agree."""

from __future__ import annotations

import argparse
import sys

from monoray.sweep.paths import add_store_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="check a sweep's records: Optuna study vs MLflow runs vs checkpoints",
        description="Exit 0 if the sweep's records agree, 2 with one line per problem otherwise.",
    )
    p.add_argument("sweep", help="sweep name")
    add_store_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from monoray.sweep.audit import audit_sweep

    report = audit_sweep(
        args.sweep, root=args.root, storage=args.storage, tracking_uri=args.tracking_uri
    )
    for problem in report.problems:
        print(f"monoray audit: {problem}", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 2
