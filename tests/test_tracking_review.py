"""What a reviewer finds after a sweep: the parent run as its summary, trial runs to look at,
the Optuna side. One real digits sweep (real Ray, Optuna RDB, MLflow) serves the module."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from optuna.trial import TrialState

from monoray.sweep.audit import audit_sweep
from monoray.sweep.links import run_path
from monoray.sweep.models import KNEE_ALIAS, MODEL_TAG, knee
from monoray.sweep.pareto import FRONT_IMAGE, publish_pareto
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.space import load_space
from monoray.sweep.summary import HV_KEY, HV_REFERENCE, hypervolume_2d, log_new_steps
from monoray.sweep.tracking import (
    ARCH_TAG,
    LAMBDA_TAG,
    MLFLOW_RUN_ATTR,
    MLFLOW_URL_ATTR,
    SweepRecords,
)
from monoray.sweep.views import (
    ACTIVATIONS_IMAGE,
    ACTIVATIONS_TEXT,
    PROFILE_IMAGE,
    split_digest,
)

REPO = Path(__file__).parents[1]
NAME = "review"
TRIALS = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    """A finished 4-trial demo sweep: (root, study, records)."""
    root = tmp_path_factory.mktemp("review") / "runs"
    space = load_space(
        REPO / "search_spaces" / "demo.yaml",
        [
            "fixed.d_sae=64",
            "fixed.epochs=2",
            "fixed.batch_size=32",  # r2 > 0 after 2 epochs: the hypervolume is not 0
            "budget.max_concurrent=2",
            f"budget.num_samples={TRIALS}",
        ],
    )
    result = run_sweep(space, SweepOptions(name=NAME, root=str(root), progress=False))
    assert not result.interrupted
    paths = ProjectPaths.resolve(root)
    study = optuna.load_study(study_name=NAME, storage=paths.optuna_url)
    return root, study, SweepRecords.load(paths.tracking_uri, NAME)


def _front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return sorted(study.best_trials, key=lambda t: t.number)


def test_parent_metrics_summarise_the_sweep(swept) -> None:
    _, study, records = swept
    client = records.client
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    history = client.get_metric_history(records.parent_run_id, HV_KEY)
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, len(done) + 1))
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    front = [tuple(t.values) for t in _front(study)]
    assert values[-1] == pytest.approx(hypervolume_2d(front, HV_REFERENCE)) and values[-1] > 0
    metrics = client.get_run(records.parent_run_id).data.metrics
    states = [t.state for t in study.trials]
    assert metrics["trials_complete"] == states.count(TrialState.COMPLETE)
    assert metrics["trials_failed"] == states.count(TrialState.FAIL)
    assert metrics["trials_pruned"] == states.count(TrialState.PRUNED)
    assert metrics["best_r2"] == pytest.approx(max(v[0] for v in front))
    assert metrics["best_monoscore_mean"] == pytest.approx(max(v[1] for v in front))
    baseline = study.trials[0]
    assert metrics["baseline_r2"] == pytest.approx(baseline.values[0])
    assert metrics["baseline_monoscore_mean"] == pytest.approx(baseline.values[1])


def test_parent_note_has_the_table_gains_and_links(swept) -> None:
    _, study, records = swept
    note = records.client.get_run(records.parent_run_id).data.tags[MLFLOW_RUN_NOTE]
    assert "| trial | role | r2 | monoscore_mean | Δ r2 | Δ monoscore_mean |" in note
    base = study.trials[0]
    for t in _front(study):
        link = f"[trial-{t.number:04d}]({run_path(records.experiment_id, records.runs[t.number])})"
        assert link in note
        gain = t.values[1] - base.values[1]
        assert f"{gain:+.4g}" in note
    assert "λ = 0 baseline" in note


def test_parent_front_image_is_one_click_away(swept, tmp_path: Path) -> None:
    _, _, records = swept
    top = {a.path for a in records.client.list_artifacts(records.parent_run_id)}
    assert FRONT_IMAGE in top
    path = records.client.download_artifacts(records.parent_run_id, FRONT_IMAGE, str(tmp_path))
    assert Path(path).read_bytes()[:8] == PNG_MAGIC


def test_republishing_adds_no_steps_and_audit_stays_clean(swept, tmp_path: Path) -> None:
    root, study, records = swept
    client = records.client
    before = {
        key: len(client.get_metric_history(records.parent_run_id, key))
        for key in client.get_run(records.parent_run_id).data.metrics
    }
    publish_pareto(study, records, out_dir=tmp_path, sweep=NAME)
    after = {key: len(client.get_metric_history(records.parent_run_id, key)) for key in before}
    assert after == before
    report = audit_sweep(NAME, root=root)
    assert report.ok, report.problems


def test_log_new_steps_only_adds_missing_steps(swept) -> None:
    _, _, records = swept
    client = records.client
    run = client.create_run(records.experiment_id, run_name="scratch").info.run_id
    log_new_steps(client, run, {"hv": [(1, 0.1), (2, 0.2)]})
    log_new_steps(client, run, {"hv": [(1, 0.1), (2, 0.2), (3, 0.3)]})
    assert sorted((m.step, m.value) for m in client.get_metric_history(run, "hv")) == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
    ]
    client.delete_run(run)


def test_trial_runs_have_tags_dataset_and_profile(swept, tmp_path: Path) -> None:
    from monoray.data import load_features

    _, study, records = swept
    client = records.client
    splits = load_features("digits")
    digests = {split_digest(splits.train), split_digest(splits.val)}
    for t in study.trials:
        run = client.get_run(records.runs[t.number])
        assert run.data.tags[ARCH_TAG] == run.data.params["arch"]
        assert float(run.data.tags[LAMBDA_TAG]) == float(run.data.params["mono_coef"])
        inputs = run.inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert set(contexts) == {"training", "validation"}
        assert {d.digest for d in contexts.values()} == digests
        assert json.loads(contexts["validation"].profile)["rows"] == len(splits.val)
        assert json.loads(contexts["training"].source)["uri"] == "digits"
        if t.state == TrialState.COMPLETE:
            top = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert PROFILE_IMAGE in top
    assert float(client.get_run(records.runs[0]).data.tags[LAMBDA_TAG]) == 0.0


def test_optuna_trials_carry_their_mlflow_run(swept) -> None:
    _, study, records = swept
    for t in study.trials:
        run_id = records.runs[t.number]
        assert t.user_attrs[MLFLOW_RUN_ATTR] == run_id
        url = t.user_attrs[MLFLOW_URL_ATTR]
        assert url == f"http://127.0.0.1:5000/{run_path(records.experiment_id, run_id)}"


@given(
    st.lists(
        st.tuples(st.floats(-1, 1, width=32), st.floats(-1, 1, width=32)), min_size=0, max_size=12
    )
)
def test_hypervolume_2d_equals_the_slow_strip_sum(points: list[tuple[float, float]]) -> None:
    """Against the area under the staircase, summed over every interval between x values."""
    ref = HV_REFERENCE
    xs = sorted({ref[0], *(x for x, _ in points if x > ref[0])})
    slow = 0.0
    for left, right in itertools.pairwise(xs):
        tops = [y for x, y in points if x >= right and y > ref[1]]
        slow += (right - left) * (max(tops) - ref[1]) if tops else 0.0
    assert hypervolume_2d(points, ref) == pytest.approx(slow, abs=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_on_loopback(swept) -> None:
    root, study, _ = swept
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monoray",
            "dashboard",
            NAME,
            "--root",
            str(root),
            "--port",
            f"{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        studies = None
        while studies is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "monoray dashboard never answered"
            api = f"http://127.0.0.1:{port}/api/studies"
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError),
                urllib.request.urlopen(api, timeout=10) as r,
            ):
                studies = json.loads(r.read())["study_summaries"]
            time.sleep(0.2)
        (mine,) = [s for s in studies if s["study_name"] == NAME]
        url = f"http://127.0.0.1:{port}/api/studies/{mine['study_id']}"
        with urllib.request.urlopen(url, timeout=30) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == len(study.trials)
        attrs = {a["key"] for t in detail["trials"] for a in t["user_attrs"]}
        assert MLFLOW_RUN_ATTR in attrs and MLFLOW_URL_ATTR in attrs
        listening = {c.laddr.ip for c in _listening(proc.pid, port)}
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _listening(pid: int, port: int) -> list:
    import psutil

    return [
        c
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def test_dashboard_for_a_missing_sweep_is_one_line(swept) -> None:
    root, _, _ = swept
    done = subprocess.run(
        [sys.executable, "-m", "monoray", "dashboard", "nope", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no sweep named 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


def test_audit_finds_a_parent_step_logged_twice(swept, tmp_path: Path) -> None:
    """On a copy of the sweep's records: a second value at a logged hypervolume step."""
    import shutil

    from mlflow.tracking import MlflowClient

    root, _, records = swept
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    client = MlflowClient(ProjectPaths.resolve(copy).tracking_uri)
    client.log_metric(records.parent_run_id, HV_KEY, 0.5, step=1)
    report = audit_sweep(NAME, root=copy)
    assert [str(p) for p in report.problems] == [
        f"duplicate: parent run: {HV_KEY} logged twice at steps [1]"
    ]


def _tune_checkpoint(root: Path, number: int) -> Path:
    """The newest checkpoint Tune persisted for Optuna trial `number`."""
    for params in (ProjectPaths.resolve(root).ray_results / NAME).glob("*/params.json"):
        if json.loads(params.read_text()).get("_optuna_trial") == number:
            return max(params.parent.glob("checkpoint_*"))
    raise AssertionError(f"no Tune checkpoint of trial {number}")


def test_front_trials_show_their_activating_samples(swept, tmp_path: Path) -> None:
    _, study, records = swept
    client = records.client
    for t in _front(study):
        run_id = records.runs[t.number]
        top = {a.path for a in client.list_artifacts(run_id)}
        assert {ACTIVATIONS_IMAGE, ACTIVATIONS_TEXT} <= top
        image = client.download_artifacts(run_id, ACTIVATIONS_IMAGE, str(tmp_path))
        assert Path(image).read_bytes()[:8] == PNG_MAGIC
        text = Path(client.download_artifacts(run_id, ACTIVATIONS_TEXT, str(tmp_path)))
        lines = text.read_text().splitlines()
        assert sum(line.startswith("latent ") for line in lines) == 5
        assert {line.split()[0] for line in lines if line.startswith("  ")} == {
            "top",
            "middle",
            "bottom",
        }


def test_front_models_load_and_encode_as_the_trained_sae(swept) -> None:
    """`read_sae("models:/monoray-<sweep>@alias")` is the SAE the trial trained (Tune's
    checkpoint), bit for bit; the registry holds logged models, not checkpoints."""
    import torch

    from monoray.data import load_features
    from monoray.runs.checkpoint import load_checkpoint
    from monoray.sae.io import read_sae
    from monoray.train.artifact import sae_of_checkpoint

    root, study, records = swept
    client = records.client
    front = _front(study)
    model = f"monoray-{NAME}"
    versions = client.search_model_versions(f"name = '{model}'")
    assert sorted(v.run_id for v in versions) == sorted(records.runs[t.number] for t in front)
    by_run = {v.run_id: v for v in versions}
    for t in front:
        run = client.get_run(records.runs[t.number])
        logged = client.get_logged_model(run.data.tags[MODEL_TAG])
        assert logged.source_run_id == run.info.run_id
        assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
        assert by_run[run.info.run_id].source == logged.artifact_location
        assert "checkpoint" not in logged.artifact_location
    aliases = client.get_registered_model(model).aliases
    number_of = {v.version: int(v.tags["optuna_trial"]) for v in versions}
    assert number_of[aliases["best-r2"]] == max(front, key=lambda t: t.values[0]).number
    assert number_of[aliases["best-monoscore"]] == max(front, key=lambda t: t.values[1]).number
    assert number_of[aliases[KNEE_ALIAS]] == knee(front, list(study.directions)).number

    x = torch.from_numpy(load_features("digits").val.features[:256].copy())
    tracking_uri = ProjectPaths.resolve(root).tracking_uri
    for alias, version in aliases.items():
        art = read_sae(f"models:/{model}@{alias}", tracking_uri=tracking_uri)
        ckpt = load_checkpoint(_tune_checkpoint(root, number_of[version]), with_optimizer=False)
        trained = sae_of_checkpoint(ckpt)
        with torch.no_grad():
            z = dense(art.sae.encode(art.prepare(x)))
            assert torch.equal(z, dense(trained.sae.encode(trained.prepare(x))))
            assert torch.equal(art.sae.decode(z), trained.sae.decode(z))
            assert z.count_nonzero() > 0


def dense(latents):
    return latents.to_dense() if hasattr(latents, "to_dense") else latents


def test_knee_is_the_point_farthest_above_the_chord() -> None:
    from optuna.study import StudyDirection
    from optuna.trial import create_trial

    up = [StudyDirection.MAXIMIZE] * 2
    trials = [
        create_trial(values=v, state=TrialState.COMPLETE)
        for v in ([0.9, 0.1], [0.7, 0.6], [0.5, 0.7], [0.1, 0.9])
    ]
    for i, t in enumerate(trials):
        t.number = i
    # scaled to [0, 1]: sums 1.0, 1.375, 1.25, 1.0
    assert knee(trials, up).number == 1
    assert knee(trials[:1], up).number == 0
    assert knee([trials[0], trials[3]], up).number == 0  # a tie: the lower number
    assert knee([], up) is None
    down = [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert knee(trials, down).number == 0  # (0.9, 0.1) is best in both


def test_an_sae_with_no_firing_latent_logs_why_instead_of_samples(swept, tmp_path: Path) -> None:
    import torch

    from monoray.data import load_features
    from monoray.sae.io import read_sae
    from monoray.sweep.views import log_activations

    root, _, records = swept
    client = records.client
    art = read_sae(
        f"models:/monoray-{NAME}@{KNEE_ALIAS}", tracking_uri=ProjectPaths.resolve(root).tracking_uri
    )
    with torch.no_grad():
        for p in art.sae.parameters():
            p.zero_()
    run = client.create_run(records.experiment_id, run_name="dead").info.run_id
    log_activations(client, run, art, load_features("digits").val)
    top = {a.path for a in client.list_artifacts(run)}
    assert top == {ACTIVATIONS_TEXT}
    text = Path(client.download_artifacts(run, ACTIVATIONS_TEXT, str(tmp_path))).read_text()
    assert text == "this SAE: no latent fires on the val split\n"
    client.delete_run(run)
