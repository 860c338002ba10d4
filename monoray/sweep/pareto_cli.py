"""`monoray pareto SWEEP`: recompute and publish a sweep's Pareto front."""

from __future__ import annotations

import argparse

from monoray.sweep.paths import add_store_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pareto", help="print and record the Pareto front of a sweep")
    p.add_argument("sweep", help="sweep name")
    add_store_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from monoray.sweep.links import sweep_links, ui_base
    from monoray.sweep.pareto import publish_pareto
    from monoray.sweep.paths import ProjectPaths
    from monoray.sweep.search import load_sweep_study
    from monoray.sweep.tracking import SweepRecords

    paths = ProjectPaths.resolve(args.root)
    study = load_sweep_study(args.sweep, args.storage or paths.optuna_url)
    records = SweepRecords.load(args.tracking_uri or paths.tracking_uri, args.sweep)
    report = publish_pareto(study, records, out_dir=paths.sweep_dir(args.sweep), sweep=args.sweep)
    print(f"Pareto front of {args.sweep} ({' vs '.join(report.metrics)}):")
    print(report.table())
    print(f"table: {report.csv_path}\nplot: {report.html_path}")
    base = ui_base(args.tracking_uri or paths.tracking_uri)
    print("\n".join(sweep_links(base, records.experiment_id, records.parent_run_id).lines()))
    return 0
