"""Where a sweep's records open in the MLflow UI (its model-training view, not the GenAI one)."""

from __future__ import annotations

UI_URL = "http://127.0.0.1:5000"
"""What `monoray ui` serves by default; runs tracked in a database open there."""
VIEW = "?workflowType=machine_learning"
"""MLflow 3 opens experiments in its GenAI view unless the URL asks for this one."""


def ui_base(tracking_uri: str) -> str:
    """The UI that shows a tracking store: an MLflow server itself, else `monoray ui`'s."""
    scheme = tracking_uri.partition(":")[0]
    return tracking_uri.rstrip("/") if scheme in ("http", "https") else UI_URL


def run_path(experiment_id: str, run_id: str) -> str:
    """The UI's route to a run (relative: it works from whatever host and port serves the UI)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{VIEW}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/{run_path(experiment_id, run_id)}"
