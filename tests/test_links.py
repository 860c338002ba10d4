"""The links monoray prints open the model-training view of the right MLflow UI."""

from __future__ import annotations

from monoray.sweep.links import UI_URL, VIEW, run_url, server_url, sweep_links, ui_base


def test_database_stores_open_in_monoray_ui_and_servers_in_themselves() -> None:
    assert ui_base("sqlite:////tmp/x/mlflow.db") == UI_URL
    assert ui_base("postgresql://u:secret@db/mlflow") == UI_URL
    assert ui_base("https://mlflow.lab.example/") == "https://mlflow.lab.example"
    # Credentials in a server URI never reach the terminal.
    assert ui_base("http://admin:secret@10.0.0.5:5000/mlflow/") == "http://10.0.0.5:5000/mlflow"


def test_every_link_asks_for_the_model_training_view() -> None:
    links = sweep_links(server_url("127.0.0.1", 5123), "7", "abc")
    assert links.experiment == f"http://127.0.0.1:5123/#/experiments/7{VIEW}"
    assert links.parent_run == f"http://127.0.0.1:5123/#/experiments/7/runs/abc{VIEW}"
    assert run_url("sqlite:///m.db", "7", "def") == f"{UI_URL}/#/experiments/7/runs/def{VIEW}"
    assert VIEW == "?workflowType=machine_learning"
    assert server_url("::1", 5000) == "http://[::1]:5000"
