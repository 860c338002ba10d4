"""`monoray dashboard SWEEP`: optuna-dashboard on the sweep's study, on 127.0.0.1 only.

It reads the study as it is (Pareto front with the objective names, history, each trial's
MLflow run in its user attrs); the server binds loopback, so reach it from elsewhere with
`ssh -L PORT:127.0.0.1:PORT host`.
"""

from __future__ import annotations

import argparse
import sys

from monoray.sweep.paths import add_store_args

HOST = "127.0.0.1"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="open optuna-dashboard on a sweep's study (127.0.0.1)")
    p.add_argument("sweep", help="sweep name")
    p.add_argument("--port", type=int, default=8080)
    add_store_args(p)
    p.set_defaults(run=run)


def study_url(port: int, study_id: int) -> str:
    return f"http://{HOST}:{port}/dashboard/studies/{study_id}"


def run(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from monoray.sweep.paths import ProjectPaths
    from monoray.sweep.search import load_sweep_study, storage_for

    paths = ProjectPaths.resolve(args.root)
    storage_url = args.storage or paths.optuna_url
    load_sweep_study(args.sweep, storage_url)  # a missing sweep is one line, exit 2
    storage = storage_for(storage_url)
    study_id = storage.get_study_id_from_name(args.sweep)
    print(f"optuna-dashboard: {study_url(args.port, study_id)}  (Ctrl-C to stop)", file=sys.stderr)
    run_server(storage, host=HOST, port=args.port)
    return 0
