"""`monoray ui`: the MLflow UI for the project's sweeps, on 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI for the project directory")
    p.add_argument("--root", help="project directory (default: ./monoray-runs or $MONORAY_HOME)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument(
        "--auth",
        action="store_true",
        help="basic auth (mlflow --app-name basic-auth); needs MLFLOW_AUTH_CONFIG_PATH or the default admin password changed",
    )
    p.set_defaults(run=run)


def ui_command(args: argparse.Namespace) -> list[str]:
    from monoray.sweep.paths import ProjectPaths

    paths = ProjectPaths.resolve(args.root).ensure()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        paths.tracking_uri,
        "--default-artifact-root",
        paths.artifacts.as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def run(args: argparse.Namespace) -> int:
    cmd = ui_command(args)
    print(f"MLflow UI on http://{args.host}:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
    os.execv(cmd[0], cmd)
    return 0
