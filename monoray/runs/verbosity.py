"""What the libraries print: banners, hints and INFO lines off unless `--verbose`.

Only the libraries' public knobs: logger levels, Optuna's verbosity, Tune's documented
environment variables and `ray.init` flags. Nothing redirects fd 1 or 2, so monoray's own
lines and any library's real errors still reach the terminal. `--verbose` (or
`MONORAY_VERBOSE=1`, which Ray workers and child processes inherit) leaves every library
at its own defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

VERBOSE_ENV = "MONORAY_VERBOSE"
QUIET_ENV = {
    # Tune's default output engine prints its "Configuration for experiment" box, "View
    # detailed results here" and a TensorBoard hint even at RunConfig(verbose=0); the
    # legacy engine at verbose 0 prints nothing.
    "RAY_AIR_NEW_OUTPUT": "0",
    # "... may be a performance bottleneck" whenever a callback takes 0.5 s (a loaded machine).
    "TUNE_WARN_THRESHOLD_S": "60",
    # Read when mlflow is imported; the logger levels below cover an mlflow already imported.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
QUIET_LOGGERS = {
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables...", run URLs
    "alembic": logging.WARNING,  # MLflow's schema migrations
    # "Token authentication is enabled for this Ray cluster": a notice, on by monoray's design.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # Trial errors come back as one line from monoray's progress and the MLflow run; Tune's
    # own report of them is a traceback (kept in the trial's error.txt).
    "ray.tune": logging.CRITICAL,
}


def add_verbose_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show Ray's, Tune's, Optuna's and MLflow's own output (also: {VERBOSE_ENV}=1)",
    )


QUIETED_ENV = "MONORAY_QUIETED_ENV"
"""The `QUIET_ENV` keys monoray set itself (inherited by the processes it starts)."""


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose: bool) -> None:
    """Quiet the libraries for this process and the processes it starts, unless `verbose`."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        # Undo what a quiet monoray process above this one set (a user's own settings stay).
        for key in os.environ.pop(QUIETED_ENV, "").split(","):
            if key in QUIET_ENV and os.environ.get(key) == QUIET_ENV[key]:
                del os.environ[key]
        return
    quieted = [k for k in QUIET_ENV if k not in os.environ]
    for key in quieted:
        os.environ[key] = QUIET_ENV[key]
    if quieted:
        os.environ[QUIETED_ENV] = ",".join(
            filter(None, [*os.environ.get(QUIETED_ENV, "").split(","), *quieted])
        )
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def optuna_level() -> int:
    """For `optuna.logging.set_verbosity`, once optuna is imported (it resets its level then)."""
    return logging.INFO if is_verbose() else logging.WARNING


def ray_init_defaults() -> dict[str, Any]:
    """`ray.init` flags of a command: Ray's defaults when verbose, else no worker output."""
    return {} if is_verbose() else {"log_to_driver": False, "configure_logging": False}


def tune_verbose() -> int:
    """`tune.RunConfig(verbose=...)`: 0 hides Tune's status table; monoray shows progress."""
    return 1 if is_verbose() else 0
