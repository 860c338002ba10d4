"""The demo sweep with PostgreSQL as the shared backend of both Optuna and MLflow.

A multi-node sweep needs one database every node can reach; this runs the demo
space against a real PostgreSQL (`.ci/run` starts a throwaway one and exports
MONORAY_TEST_POSTGRES_URL) and checks the same records as the SQLite demo test.
Without that variable the test skips locally, and fails under CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.search import BASELINE_ATTR, storage_for
from monoray.sweep.space import load_space
from monoray.sweep.tracking import PARETO_TAG, SweepRecords

pytestmark = pytest.mark.integration
URL_ENV = "MONORAY_TEST_POSTGRES_URL"
DEMO = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"
SMALL = ["fixed.d_sae=64", "fixed.epochs=2", "fixed.batch_size=128", "budget.max_concurrent=2"]
EPOCHS, TRIALS = 2, 3


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get(URL_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"{URL_ENV} is not set: .ci/run starts PostgreSQL and must export it")
    pytest.skip(f"no PostgreSQL: set {URL_ENV} (source .ci/postgres.sh && start_postgres)")


@pytest.fixture
def databases(postgres_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh databases (Optuna, MLflow) on the server, dropped afterwards."""
    import psycopg2
    from sqlalchemy.engine import make_url

    base = make_url(postgres_url)
    names = [f"monoray_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")]
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        yield tuple(base.set(database=n).render_as_string(hide_password=False) for n in names)
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def test_demo_sweep_on_postgres(ray_session, project: Path, databases: tuple[str, str]) -> None:
    storage_url, tracking_uri = databases
    space = load_space(DEMO, [*SMALL, f"budget.num_samples={TRIALS}"])
    opts = SweepOptions(
        name="demo-pg", storage=storage_url, tracking_uri=tracking_uri, progress=False
    )
    result = run_sweep(space, opts)
    assert not result.interrupted
    assert result.n_complete + result.n_failed == TRIALS

    # Optuna: every trial finished, the baseline first, nothing in a project SQLite file.
    study = optuna.load_study(study_name="demo-pg", storage=storage_for(storage_url))
    assert len(study.trials) == TRIALS
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials)
    assert all(len(t.values) == 2 for t in study.trials if t.state == TrialState.COMPLETE)
    assert study.trials[0].user_attrs.get(BASELINE_ATTR)
    assert "mono_coef" not in study.trials[0].params
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()

    # MLflow: one nested run per trial with its per-epoch metrics and checkpoint.
    records = SweepRecords.load(tracking_uri, "demo-pg")
    client: MlflowClient = records.client
    assert sorted(records.runs) == [t.number for t in study.trials]
    for t in study.trials:
        run = client.get_run(records.runs[t.number])
        assert run.data.tags["mlflow.parentRunId"] == records.parent_run_id
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "FAILED")
        if t.state == TrialState.COMPLETE:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "r2")]
            assert sorted(steps) == list(range(1, EPOCHS + 1))
            assert client.list_artifacts(run.info.run_id, "checkpoint")
            # Artifacts go to the project directory, not ./mlruns of some working directory.
            assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert client.get_run(records.parent_run_id).info.status == "FINISHED"
    assert client.get_run(records.runs[0]).data.params["mono_coef"] == "0.0"

    # The Pareto front: artifacts on the parent, tags and registered versions agree.
    parent_files = {a.path for a in client.list_artifacts(records.parent_run_id, "pareto")}
    assert {"pareto/pareto.csv", "pareto/pareto_front.html"} <= parent_files
    tagged = sorted(
        n
        for n, rid in records.runs.items()
        if client.get_run(rid).data.tags.get(PARETO_TAG) == "true"
    )
    assert result.pareto is not None and tagged
    assert tagged == sorted(row["trial"] for row in result.pareto.rows if row["front"])
    versions = client.search_model_versions("name = 'monoray-demo-pg'")
    assert sorted(v.run_id for v in versions) == sorted(records.runs[n] for n in tagged)
