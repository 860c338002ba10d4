"""Where a project's sweeps live: one directory, absolute paths everywhere.

Ray Tune runs each trial in its own working directory, so a relative URI such
as `sqlite:///mlflow.db` would silently scatter databases across trial dirs.
Everything here is resolved to an absolute path once, in the driver.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = "monoray-runs"
ROOT_ENV = "MONORAY_HOME"


@dataclass(frozen=True, slots=True)
class ProjectPaths:
    """The project directory and the stores inside it."""

    root: Path
    """Absolute project directory (default `./monoray-runs`, or $MONORAY_HOME)."""

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None) -> ProjectPaths:
        chosen = root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT
        return cls(Path(chosen).expanduser().resolve())

    def ensure(self) -> ProjectPaths:
        for path in (self.root, self.artifacts, self.ray_results, self.trials):
            path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def tracking_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_db}"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray"

    @property
    def trials(self) -> Path:
        """Scratch space where trials write checkpoints before Tune persists them."""
        return self.root / "trials"

    def sweep_dir(self, name: str) -> Path:
        return self.root / "sweeps" / name


def add_store_args(p: argparse.ArgumentParser) -> None:
    """`--root`, `--tracking-uri`, `--storage`: where a command finds a sweep's records."""
    p.add_argument("--root", help="project directory (default: ./monoray-runs or $MONORAY_HOME)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: <root>/mlflow.db)")
    p.add_argument("--storage", help="Optuna RDB URL (default: <root>/optuna.db)")
