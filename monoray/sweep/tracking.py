"""MLflow records of a sweep, written by one process: the Tune driver.

Trials never talk to MLflow. A Tune `Callback` in the driver creates one
experiment per sweep, a parent run, and one nested run per trial, keyed by the
trial's Optuna number so retries and `--resume` reuse the run instead of
duplicating it. SQLite then has a single writer, and nothing depends on the
MLFLOW_EXPERIMENT_ID environment variable (which Ray's own callback prefers
over the experiment name).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from optuna.trial import TrialState
from ray.tune import Callback

from monoray.sweep.links import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, SERVER_SCHEMES
from monoray.sweep.search import (
    STOPPED_ATTR,
    STOPPED_VALUES_ATTR,
    TRIAL_KEY,
    failure_reason,
    redact,
    with_driver,
)
from monoray.trials.packed import (
    MEMBERS_KEY,
    PACK_KEY,
    member_dir,
    member_outcomes,
    member_reports,
    pack_members,
)
from monoray.trials.verdicts import STOPPED_KEY

SWEEP_TAG = "monoray.sweep"
ROLE_TAG = "monoray.role"
TRIAL_TAG = "monoray.optuna_trial"
RAY_TRIAL_TAG = "monoray.ray_trial_id"
PARETO_TAG = "monoray.pareto"
ERROR_TAG = "monoray.error"
STOPPED_TAG = "monoray.stopped"
"""On a trial MO-ASHA stopped (status KILLED): the rung, epoch and why."""
ARCH_TAG = "monoray.arch"
"""The trial's SAE architecture (or finetune backbone)."""
LAMBDA_TAG = "monoray.mono_coef"
"""The trial's MonoLoss coefficient λ (0 for the baseline)."""
MLFLOW_RUN_ATTR = "mlflow_run_id"
MLFLOW_URL_ATTR = "mlflow_run_url"
"""User attrs of each Optuna trial: its MLflow run, set when the run is created."""
# Result keys that are bookkeeping, not metrics.
_NOT_METRICS = {
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "pid",
    MEMBERS_KEY,
}
_MAX_PARAM = 6000


DATABASE_SCHEMES = ("sqlite", "postgresql")


def artifact_root_for(tracking_uri: str, project_artifacts: Path) -> Path | None:
    """Where a sweep's artifacts go: the server's store, else the project's directory.

    With a database URI MLflow would default to `./mlruns` in whatever the
    working directory is (a Tune trial's, on a cluster a node's); the project
    directory (`--root`, shared storage on a cluster) is the one place all agree on.
    """
    scheme = tracking_uri.partition(":")[0].partition("+")[0]
    return None if scheme in SERVER_SCHEMES else project_artifacts


def client_for(tracking_uri: str) -> MlflowClient:
    """An MLflow client; `postgresql://` URIs use psycopg2 (see `search.with_driver`)."""
    return MlflowClient(with_driver(tracking_uri))


def check_tracking_uri(tracking_uri: str) -> None:
    """Reach the tracking store once (a database gets its schema); `InputError` if it cannot."""
    import urllib.error
    import urllib.request

    from monoray.errors import InputError

    where = f"--tracking-uri {redact(tracking_uri)}"
    scheme = tracking_uri.partition(":")[0].partition("+")[0]
    if scheme not in SERVER_SCHEMES + DATABASE_SCHEMES:
        raise InputError(f"{where}: expected an http(s), sqlite or postgresql URI")
    try:
        if scheme in SERVER_SCHEMES:
            # Any HTTP answer (401 included) is a server; MLflow's client would retry for minutes.
            urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10).close()
        else:
            if scheme == "postgresql":  # MLflow itself would retry with backoff for minutes
                _connect_once(tracking_uri)
            client_for(tracking_uri).search_experiments(max_results=1)
    except urllib.error.HTTPError:
        return
    except Exception as err:  # MLflow wraps SQLAlchemy errors in several types
        lines = str(getattr(err, "reason", None) or err).strip().splitlines()
        reason = lines[0][:300] if lines else type(err).__name__
        raise InputError(f"{where}: cannot reach it ({reason})") from None


def _connect_once(url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(with_driver(url), connect_args={"connect_timeout": 10})
    try:
        engine.connect().close()
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise ConnectionError(str(getattr(err, "orig", None) or err)) from None
    finally:
        engine.dispose()


def experiment_name(sweep: str) -> str:
    return f"monoray/{sweep}"


def open_experiment(client: MlflowClient, sweep: str, artifact_root: Path | None) -> str:
    name = experiment_name(sweep)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older monoray
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = (artifact_root / sweep).as_uri() if artifact_root else None
    tags = {SWEEP_TAG: sweep, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    return client.create_experiment(name, artifact_location=location, tags=tags)


def find_parent(client: MlflowClient, experiment_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def trial_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'", max_results=50_000
    )


def flat_params(config: dict[str, Any]) -> list[Param]:
    return [
        Param(str(k), json.dumps(v) if not isinstance(v, str) else v[:_MAX_PARAM])
        for k, v in sorted(config.items())
        if not str(k).startswith("_")
    ]


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of a Tune result (profiles and strings stay out)."""
    out = {}
    for key, value in result.items():
        if key in _NOT_METRICS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def trial_members(trial: Any) -> list[tuple[int, dict[str, Any]]]:
    """(Optuna trial number, parameters) of each Optuna trial a Tune trial runs (a pack: several)."""
    if PACK_KEY in trial.config:
        return pack_members(trial.config)
    return [(int(trial.config[TRIAL_KEY]), trial.config)]


def member_results(trial: Any) -> list[tuple[int, dict[str, Any]]]:
    """(Optuna trial number, last result) of each Optuna trial a Tune trial runs (a pack:
    each member's final outcome once the pack ended, {} before)."""
    last = trial.last_result or {}
    if PACK_KEY not in trial.config:
        return [(number, last) for number, _ in trial_members(trial)]
    outcomes = member_outcomes(last)
    return [(number, outcomes.get(number, {})) for number, _ in trial_members(trial)]


def error_line(trial: Any) -> str:
    """Why a Tune trial errored: the last line of its error file (the exception)."""
    message = "trial raised an error"
    if trial.error_file and Path(trial.error_file).is_file():
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        message = lines[-1][:500] if lines else message
    return message


def trial_tags(config: dict[str, Any]) -> dict[str, str]:
    """Architecture and λ of a trial, as tags (searchable and shown in the runs table)."""
    tags = {}
    arch = config.get("arch", config.get("backbone"))
    if arch is not None:
        tags[ARCH_TAG] = str(arch)
    if config.get("mono_coef") is not None:
        tags[LAMBDA_TAG] = str(float(config["mono_coef"]))
    return tags


class MlflowTracker(Callback):
    """Tune callback: the only MLflow writer of a sweep."""

    def __init__(
        self,
        tracking_uri: str,
        sweep: str,
        *,
        space: dict[str, Any],
        metrics: list[str],
        artifact_root: Path | None,
        storage_url: str | None = None,
        datasets: list[DatasetInput] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.sweep = sweep
        self.space = space
        self.metrics = metrics
        self.artifact_root = artifact_root
        self.storage_url = storage_url
        """The sweep's Optuna storage: each trial gets its MLflow run as user attrs."""
        self.datasets = datasets or []
        """Logged as every trial run's input."""
        self._runs: dict[int, str] = {}
        self._last_epoch: dict[int, int] = {}
        self.experiment_id = ""
        self.parent_run_id = ""

    # Tune pickles callbacks with the experiment; the client is rebuilt on setup.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_client", None)
        state.pop("_storage", None)
        state["_runs"], state["_last_epoch"] = {}, {}
        return state

    @property
    def client(self) -> MlflowClient:
        if getattr(self, "_client", None) is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def setup(self, **info: Any) -> None:
        self.open_parent()

    def open_parent(self) -> str:
        """Create the sweep's experiment and parent run, or reopen them on resume."""
        self.experiment_id = open_experiment(self.client, self.sweep, self.artifact_root)
        parent = find_parent(self.client, self.experiment_id)
        if parent is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.sweep,
                tags={SWEEP_TAG: self.sweep, ROLE_TAG: "parent"},
            )
            parent = run.info.run_id
            self.client.log_dict(parent, self.space, "space.json")
            self.client.log_batch(
                parent,
                params=[
                    Param("objectives", ",".join(self.metrics)),
                    Param("space_file", str(self.space.get("path", ""))),
                ],
            )
        else:
            self.client.update_run(parent, status="RUNNING")
        self.parent_run_id = parent
        for run in trial_runs(self.client, self.experiment_id):
            number = int(run.data.tags[TRIAL_TAG])
            self._runs[number] = run.info.run_id
            self._last_epoch[number] = int(run.data.metrics.get("epoch", 0))
        return parent

    def run_for(self, trial: Any, number: int | None = None) -> str:
        """The MLflow run of Optuna trial `number` (default: the trial's own), created once."""
        members = dict(trial_members(trial))
        number = next(iter(members)) if number is None else number
        run_id = self._runs.get(number)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                tags={
                    MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                    MLFLOW_RUN_NAME: f"trial-{number:04d}",
                    SWEEP_TAG: self.sweep,
                    ROLE_TAG: "trial",
                    TRIAL_TAG: str(number),
                    RAY_TRIAL_TAG: trial.trial_id,
                    **trial_tags(members[number]),
                },
            )
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=flat_params(members[number]))
            if self.datasets:
                self.client.log_inputs(run_id, datasets=self.datasets)
            self.link_optuna_trial(number, run_id)
            self._runs[number] = run_id
            self._last_epoch[number] = 0
        return run_id

    def link_optuna_trial(self, number: int, run_id: str) -> None:
        """Optuna trial `number` gets its MLflow run id and UI link as user attrs."""
        if self.storage_url is None:
            return
        from monoray.sweep.links import run_url

        storage, trial_id = self._optuna_trial(number)
        storage.set_trial_user_attr(trial_id, MLFLOW_RUN_ATTR, run_id)
        url = run_url(self.tracking_uri, self.experiment_id, run_id)
        storage.set_trial_user_attr(trial_id, MLFLOW_URL_ATTR, url)

    def _optuna_trial(self, number: int) -> tuple[Any, int]:
        """The study's storage and the storage id of Optuna trial `number`."""
        from monoray.sweep.search import storage_for

        assert self.storage_url is not None
        if getattr(self, "_storage", None) is None:
            self._storage = storage_for(self.storage_url)
        storage = self._storage
        study_id = storage.get_study_id_from_name(self.sweep)
        return storage, storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def _stop_of(self, number: int) -> dict[str, Any] | None:
        """The stop-epoch result of Optuna trial `number` if MO-ASHA stopped it (PRUNED)."""
        if self.storage_url is None:
            return None
        storage, trial_id = self._optuna_trial(number)
        trial = storage.get_trial(trial_id)
        why, values = trial.user_attrs.get(STOPPED_ATTR), trial.user_attrs.get(STOPPED_VALUES_ATTR)
        if trial.state != TrialState.PRUNED or why is None or values is None:
            return None
        return {
            STOPPED_KEY: why,
            **dict(zip(self.metrics, values, strict=True)),
        }

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for number, _ in trial_members(trial):
            run_id = self.run_for(trial, number)
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, RAY_TRIAL_TAG, trial.trial_id)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if PACK_KEY not in trial.config:
            self._log_epoch(trial, int(trial.config[TRIAL_KEY]), result)
            return
        for number, report in member_reports(result).items():  # none in a pack's last result
            self._log_epoch(trial, number, report)

    def _log_epoch(self, trial: Any, number: int, result: dict[str, Any]) -> None:
        """Optuna trial `number`'s epoch result, to its MLflow run."""
        run_id = self.run_for(trial, number)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch <= self._last_epoch.get(number, 0):
            return  # already logged before a retry or a resume: never duplicate
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in numeric_metrics(result).items()]
        self.client.log_batch(run_id, metrics=metrics)
        self._last_epoch[number] = epoch

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        packed = PACK_KEY in trial.config
        for number, result in member_results(trial):
            member = number if packed else None
            self.end_run(self.run_for(trial, number), result, trial.checkpoint, member)

    def end_run(
        self, run_id: str, result: dict[str, Any], checkpoint: Any, member: int | None
    ) -> None:
        """Log the final checkpoint (a pack member's part of it) and end the run as it ended."""
        reason = failure_reason(result, self.metrics, error=False)
        if checkpoint is not None and checkpoint.path:
            self.log_checkpoint(run_id, checkpoint, member)
        if reason is None and result.get(STOPPED_KEY):
            self.client.set_tag(run_id, STOPPED_TAG, str(result[STOPPED_KEY]))
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        elif reason is None:
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        else:
            self.fail(run_id, reason)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        message = error_line(trial)
        for number, _ in trial_members(trial):
            run_id = self.run_for(trial, number)
            stopped = self._stop_of(number) if PACK_KEY in trial.config else None
            if stopped is None:
                self.fail(run_id, message)
            else:  # a pack member MO-ASHA stopped before the pack failed: it ended there
                self.end_run(run_id, stopped, trial.checkpoint, number)

    def fail(self, run_id: str, reason: str) -> None:
        self.client.set_tag(run_id, ERROR_TAG, reason[:5000])
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))

    def log_checkpoint(self, run_id: str, checkpoint: Any, member: int | None = None) -> None:
        """The final checkpoint as Tune persisted it (a pack: the member's), and the MonoScore
        profile it holds."""
        from monoray.sweep.views import log_profile

        with checkpoint.as_directory() as path:
            local = Path(path) if member is None else member_dir(Path(path), member)
            if local.is_dir():  # a member that diverged in its first epoch has none
                self.client.log_artifacts(run_id, str(local), "checkpoint")
                log_profile(self.client, run_id, local)

    def finish_parent(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status)

    def records(self) -> SweepRecords:
        return SweepRecords(self.client, self.experiment_id, self.parent_run_id, dict(self._runs))


class SweepRecords:
    """A sweep's MLflow records, read back: for `monoray pareto` and after a run."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, runs: dict):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.runs: dict[int, str] = runs

    @classmethod
    def load(cls, tracking_uri: str, sweep: str) -> SweepRecords:
        from monoray.errors import InputError

        client = client_for(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name(sweep))
        parent = find_parent(client, experiment.experiment_id) if experiment else None
        if experiment is None or parent is None:
            raise InputError(f"no MLflow records of sweep {sweep!r} in {tracking_uri}")
        runs = {
            int(r.data.tags[TRIAL_TAG]): r.info.run_id
            for r in trial_runs(client, experiment.experiment_id)
        }
        return cls(client, experiment.experiment_id, parent, runs)
