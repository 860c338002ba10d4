"""The front's SAEs in MLflow: logged models (the SAE artifact, no pickle), registered with aliases.

Each front trial's final checkpoint (as Tune persisted it, copied into its MLflow run)
becomes the SAE artifact of `monoray.sae.io` (`sae.safetensors` + `cfg.json`), logged as an
MLflow 3 LoggedModel of the trial's run, plain files with no MLmodel flavour, so nothing is
ever unpickled or imported to load it. The registered model `monoray-<sweep>` holds one
version per front trial and the aliases `best-r2`, `best-monoscore` (best value of each
objective on the front) and `knee`. Load one with
`monoray.sae.io.read_sae("models:/monoray-<sweep>@knee", tracking_uri=...)`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from monoray.sae.io import ARTIFACT_FORMAT, SAEArtifact

MODEL_TAG = "monoray.model_id"
"""On a trial run: the id of its logged SAE model."""
MODEL_NAME = "sae"
KNEE_ALIAS = "knee"


def alias_for(metric: str) -> str:
    """`best-<objective>` without a `_mean` suffix: `best-r2`, `best-monoscore`."""
    return "best-" + metric.removesuffix("_mean").replace("_", "-")


def knee(front: list[FrozenTrial], directions: list[StudyDirection]) -> FrozenTrial | None:
    """The front trial with the largest sum of its objectives, each scaled to [0, 1] over the
    front (1: the front's best). With two objectives that is the point farthest above the
    chord between the front's two extremes. Ties go to the lowest trial number."""
    if not front:
        return None
    scaled = [0.0] * len(front)
    for i, d in enumerate(directions):
        values = [t.values[i] if d == StudyDirection.MAXIMIZE else -t.values[i] for t in front]
        low, span = min(values), max(values) - min(values)
        for j, v in enumerate(values):
            scaled[j] += (v - low) / span if span > 0 else 1.0
    best = max(scaled)
    return min((t for t, s in zip(front, scaled, strict=True) if s == best), key=lambda t: t.number)


def log_sae_model(client: MlflowClient, experiment_id: str, run_id: str, art: SAEArtifact) -> str:
    """A trial's SAE artifact as a logged model of its run (once); its model id."""
    from monoray.sae.io import save_sae

    known = client.get_run(run_id).data.tags.get(MODEL_TAG)
    if known:
        return known
    cfg = art.sae.cfg
    model = client.create_logged_model(
        experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        params={"arch": cfg.arch, "d_in": str(cfg.d_in), "d_sae": str(cfg.d_sae)},
        tags={"format": ARTIFACT_FORMAT, "epoch": str(art.epoch)},
        model_type="sparse-autoencoder",
    )
    with tempfile.TemporaryDirectory(prefix="monoray-sae-") as tmp:
        path = save_sae(
            art.sae,
            Path(tmp) / MODEL_NAME,
            normalisation=art.normalisation,
            epoch=art.epoch,
            data=art.data,
        )
        client.log_model_artifacts(model.model_id, str(path))
    client.finalize_logged_model(model.model_id, "READY")
    # An output of its run: the run page's "Logged models" lists it.
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=int(art.epoch or 0))])
    client.set_tag(run_id, MODEL_TAG, model.model_id)
    return model.model_id


def register_front(
    client: MlflowClient,
    name: str,
    study: optuna.Study,
    metrics: list[str],
    front: list[FrozenTrial],
    runs: dict[int, str],
    models: dict[int, str],
) -> None:
    """One version of `name` per front trial's logged model; the aliases onto the front."""
    try:
        client.create_registered_model(name, description="Pareto-optimal SAEs of a monoray sweep")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    version_of = {
        v.run_id: v.version
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get("format") == ARTIFACT_FORMAT  # not the checkpoints older sweeps registered
    }
    for t in front:
        run_id, model_id = runs.get(t.number), models.get(t.number)
        if run_id is None or model_id is None or run_id in version_of:
            continue
        version = client.create_model_version(
            name,
            source=client.get_logged_model(model_id).artifact_location,
            run_id=run_id,
            model_id=model_id,
            tags={"optuna_trial": str(t.number), "format": ARTIFACT_FORMAT},
            description=", ".join(f"{k}={v}" for k, v in sorted(t.params.items())),
        )
        version_of[run_id] = version.version
    on_front = [t for t in front if runs.get(t.number) in version_of]
    picks = {}
    for i, (m, d) in enumerate(zip(metrics, study.directions, strict=True)):
        pick = max if d == StudyDirection.MAXIMIZE else min
        picks[alias_for(m)] = pick(on_front, key=lambda t, i=i: t.values[i], default=None)
    picks[KNEE_ALIAS] = knee(on_front, list(study.directions))
    for alias, t in picks.items():
        if t is not None:
            client.set_registered_model_alias(name, alias, version_of[runs[t.number]])
