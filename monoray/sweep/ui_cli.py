"""`monoray ui`: the MLflow UI for the project's sweeps, on 127.0.0.1 by default.

`--auth` serves it with MLflow's basic auth (`mlflow server --app-name basic-auth`).
The admin password comes from `MLFLOW_AUTH_ADMIN_PASSWORD` (or `admin_password`
in the file `MLFLOW_AUTH_CONFIG_PATH` names) and is never written by monoray; a
missing, short, or MLflow's old default password (`password1234`) is refused.
Without `MLFLOW_AUTH_CONFIG_PATH`, monoray writes `<root>/basic_auth.ini` (mode
600) so the user database lives in the project, not in the working directory.
Binding to anything but loopback requires `--auth`.
"""

from __future__ import annotations

import argparse
import configparser
import os
import secrets
import sys
from pathlib import Path

from monoray.errors import InputError
from monoray.sweep.links import UI_HOST, UI_PORT, SweepLinks, server_url, sweep_links

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LEGACY_DEFAULT_PASSWORD = "password1234"
"""The admin password older MLflow versions shipped in basic_auth.ini (GHSA-gq3w-7jj3-x7gr)."""
MIN_PASSWORD_LENGTH = 12
"""MLflow's own password policy."""
PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_INI = "basic_auth.ini"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI for the project directory")
    p.add_argument("--root", help="project directory (default: ./monoray-runs or $MONORAY_HOME)")
    p.add_argument(
        "--host",
        default=UI_HOST,
        help=f"bind address (default {UI_HOST}; anything else needs --auth)",
    )
    p.add_argument("--port", type=int, default=UI_PORT)
    p.add_argument("--sweep", help="print the links of this sweep (default: the latest one)")
    p.add_argument(
        "--auth",
        action="store_true",
        help=f"MLflow basic auth (--app-name basic-auth); the admin password comes from {PASSWORD_ENV}",
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
        "--workers",
        "1",  # one local user: no worker supervisor, whose health check kills slow starts
    ]
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def check_host(host: str, auth: bool) -> None:
    if host not in LOOPBACK and not auth:
        raise InputError(
            f"--host {host}: serving the UI beyond this machine needs --auth "
            "(or keep 127.0.0.1 and use ssh -L 5000:127.0.0.1:5000)"
        )


def auth_env(root: Path, environ: dict[str, str]) -> dict[str, str]:
    """The environment of an auth server: its config file, a checked admin password, a secret key."""
    env = dict(environ)
    config_file = Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None
    if config_file is not None and not config_file.is_file():
        raise InputError(f"{CONFIG_ENV}={config_file}: no such file")
    # MLflow's precedence: the variable, when set (even empty), beats the file.
    if PASSWORD_ENV in env or config_file is None:
        password = env.get(PASSWORD_ENV)
    else:
        password = _ini_password(config_file)
    check_admin_password(password)
    if config_file is None:
        env[CONFIG_ENV] = str(write_auth_config(root))
    # One server: a fresh CSRF key per start. Several servers must share one (set it yourself).
    env.setdefault(SECRET_ENV, secrets.token_urlsafe(32))
    return env


def check_admin_password(password: str | None) -> None:
    if not password:
        raise InputError(
            f"--auth: set {PASSWORD_ENV} to the admin password "
            f"({MIN_PASSWORD_LENGTH}+ characters); there is no default"
        )
    if password == LEGACY_DEFAULT_PASSWORD:
        raise InputError(
            f"--auth: refusing MLflow's old default admin password; set {PASSWORD_ENV} to another"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InputError(
            f"--auth: the admin password must have at least {MIN_PASSWORD_LENGTH} characters"
        )


def write_auth_config(root: Path) -> Path:
    """`<root>/basic_auth.ini`: the user database in the project; no password in it."""
    path = root / AUTH_INI
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": f"sqlite:///{root / 'basic_auth.db'}",
        "admin_username": "admin",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        config.write(f)
    path.chmod(0o600)
    return path


def _ini_password(path: Path) -> str | None:
    config = configparser.ConfigParser()
    try:
        config.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable auth config ({type(err).__name__})") from None
    return config.get("mlflow", "admin_password", fallback=None)


def sweep_links_in(tracking_uri: str, base: str, sweep: str | None) -> SweepLinks | None:
    """Links to `sweep` (default: the newest one) in the UI at `base`; `InputError` if unknown."""
    from monoray.sweep.tracking import SWEEP_TAG, SweepRecords, client_for

    if sweep is None:
        found = client_for(tracking_uri).search_experiments(
            filter_string=f"tags.`{SWEEP_TAG}` LIKE '%'",
            order_by=["creation_time DESC"],
            max_results=1,
        )
        if not found:
            return None
        sweep = found[0].tags[SWEEP_TAG]
    records = SweepRecords.load(tracking_uri, sweep)
    return sweep_links(base, records.experiment_id, records.parent_run_id)


def run(args: argparse.Namespace) -> int:
    from monoray.sweep.paths import ProjectPaths

    check_host(args.host, args.auth)
    cmd = ui_command(args)
    env = dict(os.environ)
    if args.auth:
        env = auth_env(ProjectPaths.resolve(args.root).root, env)
    base = server_url(args.host, args.port)
    paths = ProjectPaths.resolve(args.root)
    links = None
    if args.sweep or paths.tracking_db.exists():
        links = sweep_links_in(paths.tracking_uri, base, args.sweep)
    lines = [f"MLflow UI on {base}  (Ctrl-C to stop)"]
    lines += links.lines() if links else ["no sweep recorded here yet"]
    print("\n".join(lines), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
    return 0
