"""Where a sweep's records open in the MLflow UI: its model-training view, not the GenAI one.

MLflow 3.17's UI picks an experiment's view from the URL's `workflowType` query, else
from the toggle the browser last stored (GenAI on a first visit); the open-source UI
ignores the experiment tag `mlflow.experimentKind` for this (it reads it only where the
workflow toggle is off). So every link monoray prints carries the query, and monoray
tags its experiments with their kind too (MLflow's kind selector shows it, and UIs that
read the tag open the right view from a bare link).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

UI_HOST = "127.0.0.1"
UI_PORT = 5000
UI_URL = f"http://{UI_HOST}:{UI_PORT}"
"""What `monoray ui` serves by default; runs tracked in a database open there."""
VIEW = "?workflowType=machine_learning"
"""MLflow 3 opens experiments in its GenAI view unless the URL asks for this one."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow's name for a model-training ("Machine learning") experiment."""
SERVER_SCHEMES = ("http", "https")
"""Tracking URIs of an MLflow server, which stores artifacts itself."""


@dataclass(frozen=True, slots=True)
class SweepLinks:
    """The two pages a sweep's review starts from."""

    experiment: str
    parent_run: str

    def lines(self) -> list[str]:
        return [f"experiment: {self.experiment}", f"parent run: {self.parent_run}"]


def server_url(host: str, port: int) -> str:
    """The URL of an MLflow server listening on host:port."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def ui_base(tracking_uri: str) -> str:
    """The UI that shows a tracking store: an MLflow server itself, else `monoray ui`'s."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in SERVER_SCHEMES:
        return UI_URL
    host = parts.netloc.rpartition("@")[2]  # never print credentials
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def experiment_path(experiment_id: str) -> str:
    """The UI's route to an experiment (relative: it works from any host and port)."""
    return f"#/experiments/{experiment_id}{VIEW}"


def run_path(experiment_id: str, run_id: str) -> str:
    """The UI's route to a run (relative: it works from any host and port)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{VIEW}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/{run_path(experiment_id, run_id)}"


def sweep_links(base: str, experiment_id: str, parent_run_id: str) -> SweepLinks:
    """The experiment and parent run pages under the UI at `base` (see `ui_base`)."""
    return SweepLinks(
        experiment=f"{base}/{experiment_path(experiment_id)}",
        parent_run=f"{base}/{run_path(experiment_id, parent_run_id)}",
    )
