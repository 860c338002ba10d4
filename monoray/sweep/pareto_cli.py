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
    import optuna

    from monoray.errors import InputError
    from monoray.sweep.links import sweep_links, ui_base
    from monoray.sweep.pareto import publish_pareto
    from monoray.sweep.paths import ProjectPaths
    from monoray.sweep.search import storage_for
    from monoray.sweep.tracking import SweepRecords

    paths = ProjectPaths.resolve(args.root)
    storage_url = args.storage or paths.optuna_url
    if (
        storage_url.startswith("sqlite:///")
        and not (paths.root / "optuna.db").exists()
        and not args.storage
    ):
        raise InputError(f"no sweeps in {paths.root} (no optuna.db); pass --root or --storage")
    storage = storage_for(storage_url)
    try:
        study = optuna.load_study(study_name=args.sweep, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        raise InputError(
            f"no sweep named {args.sweep!r} in {storage_url} (have: {', '.join(names) or 'none'})"
        ) from None
    records = SweepRecords.load(args.tracking_uri or paths.tracking_uri, args.sweep)
    report = publish_pareto(study, records, out_dir=paths.sweep_dir(args.sweep), sweep=args.sweep)
    print(f"Pareto front of {args.sweep} ({' vs '.join(report.metrics)}):")
    print(report.table())
    print(f"table: {report.csv_path}\nplot: {report.html_path}")
    base = ui_base(args.tracking_uri or paths.tracking_uri)
    print("\n".join(sweep_links(base, records.experiment_id, records.parent_run_id).lines()))
    return 0
