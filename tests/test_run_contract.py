"""The run contract (`monoray.runs.outcome`): every run ends alike, whatever executes it.

In process and on 2 Ray Train workers, `monoray finetune` writes the same
`metrics.json` and checkpoint layout, `--resume` continues a multi-worker run
from the user's out dir, and a run that diverges in epoch 2 exits with
`DIVERGED_EXIT` and one line, keeping epoch 1's checkpoint; `monoray train`
does the same; inside a sweep the diverging 2-worker trial is one FAILED trial
in Optuna and MLflow, with its reason, not retried.

Divergence is forced by the learning rate, deterministically on CPU: with one
optimizer step per epoch, SGD at lr 100 (finetune) and Adam at lr 1e16 (SAE)
leave epoch 1 finite and make epoch 2 non-finite (lr 1e15 and 1e18 behave the
same for the SAE, lr 1e30 already fails after epoch 1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from monoray.cli import main
from monoray.extract.encoders import EncoderSpec
from monoray.extract.pipeline import ExtractConfig, extract
from monoray.runs.outcome import (
    DIVERGED_EXIT,
    METRICS_FILE,
    DivergedError,
    RunFailedError,
    check_outcome,
    failure_report,
    write_metrics,
)

pytestmark = pytest.mark.integration

PROGRESS = re.compile(r"^epoch \d+: accuracy ")
"""The per-epoch progress line of an in-process `monoray finetune` (not a failure line)."""


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    """Embeddings of the digits from the extraction pipeline (a small random-init encoder)."""
    out = tmp_path_factory.mktemp("emb") / "digits"
    spec = EncoderSpec("vit-ti16", "random-init", image_size=16, device="cpu")
    extract(
        ExtractConfig(
            encoder=spec, images="digits", out=out, batch_size=512, loader_workers=0, progress=False
        )
    )
    return out


def _finetune_args(embeddings: Path, out: Path, *, lr: str, epochs: int) -> list[str]:
    """ResNet-50 (random init) on 8 digits at 32 px: one SGD step per epoch."""
    args = ["finetune", "--backbone", "resnet50", "--random-init", "--images", "digits"]
    args += ["--embeddings", str(embeddings), "--out", str(out), "--image-size", "32"]
    args += ["--subset", "8", "--batch-size", "8", "--augment", "none", "--device", "cpu"]
    return [*args, "--mono-coef", "0.05", "--lr", lr, "--epochs", str(epochs)]


def _epochs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("epoch-*"))


def _failure_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.match(ln)]


def _assert_diverged(rc: int, err: str, command: str) -> str:
    assert "Traceback" not in err
    assert rc == DIVERGED_EXIT
    (line,) = _failure_lines(err)
    assert line.startswith(f"monoray {command}: diverged: ") and "epoch 2" in line, line
    assert line.endswith("(lower --lr)")
    return line


@pytest.mark.timeout(600)
def test_finetune_in_process_and_on_two_workers_write_the_same_outputs_and_resume(
    ray_session, tmp_path, embeddings, capsys
):
    local, workers = tmp_path / "local", tmp_path / "workers"
    assert main(_finetune_args(embeddings, local, lr="0.001", epochs=2)) == 0
    assert main([*_finetune_args(embeddings, workers, lr="0.001", epochs=1), "--workers", "2"]) == 0
    capsys.readouterr()
    assert _epochs(workers) == ["epoch-0001"]
    first = json.loads((workers / METRICS_FILE).read_text())
    assert first["epoch"] == 1.0
    # --resume from the same out dir: Ray Train continues its run from out/checkpoints/.
    resumed = [*_finetune_args(embeddings, workers, lr="0.001", epochs=2), "--workers", "2"]
    assert main([*resumed, "--resume"]) == 0
    status = json.loads((workers / "workers" / "rank-1.json").read_text())
    assert status["resumed_from_epoch"] == 1  # continued, not restarted
    assert _epochs(local) == _epochs(workers) == ["epoch-0001", "epoch-0002"]
    for name in ("model.safetensors", "checkpoint.json", "monoscore_profile.json"):
        assert (workers / "checkpoints" / "epoch-0002" / name).is_file(), name
    a = json.loads((local / METRICS_FILE).read_text())
    b = json.loads((workers / METRICS_FILE).read_text())
    assert set(a) == set(b) and {"accuracy", "monoscore_mean", "train_loss", "epoch"} <= set(a)
    assert a["epoch"] == b["epoch"] == 2.0
    for key, value in a.items():  # global-batch MonoLoss: W workers train as one process
        assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Without --resume an existing run is refused (one line, exit 2), nothing touched.
    assert main(resumed) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert _epochs(workers) == ["epoch-0001", "epoch-0002"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [0, 2])
def test_finetune_divergence_is_one_line_exit_3_and_keeps_finished_epochs(
    ray_session, tmp_path, embeddings, capsys, workers
):
    out = tmp_path / "run"
    rc = main([*_finetune_args(embeddings, out, lr="100", epochs=2), "--workers", str(workers)])
    line = _assert_diverged(rc, capsys.readouterr().err, "finetune")
    if workers:
        assert "on rank 0, 1" in line  # the ranks that saw it
        assert not capsys.readouterr().out  # no empty summary
    assert _epochs(out) == ["epoch-0001"]
    assert not (out / METRICS_FILE).exists()


@pytest.mark.timeout(300)
def test_train_divergence_is_one_line_exit_3_and_keeps_finished_epochs(tmp_path, capsys):
    out = tmp_path / "sae"
    args = ["train", "--arch", "batchtopk", "--features", "digits", "--k", "8", "--d-sae", "128"]
    args += ["--epochs", "2", "--batch-size", "2000", "--lr", "1e16", "--out", str(out)]
    rc = main([*args, "--no-progress"])
    captured = capsys.readouterr()
    line = _assert_diverged(rc, captured.err, "train")
    assert captured.err == line + "\n"
    assert _epochs(out) == ["epoch-0001"]
    assert not (out / METRICS_FILE).exists()


def test_worker_failures_become_one_line_naming_the_lowest_failing_rank():
    from ray.train import WorkerGroupError

    from monoray.errors import InputError
    from monoray.sweep.search import failure_reason

    crash = WorkerGroupError("...", {3: RuntimeError("boom\n  at frame"), 1: OSError("disk full")})
    with pytest.raises(RunFailedError, match=r"^rank 1: OSError: disk full$"):
        check_outcome(None, crash)
    with pytest.raises(InputError, match=r"^labels: bad \(rank 2\)$"):
        check_outcome(None, WorkerGroupError("...", {2: InputError("labels: bad")}))
    report = failure_report(DivergedError("loss became NaN/inf in epoch 2 on rank 1"), rank=0)
    with pytest.raises(DivergedError, match=r"^loss became NaN/inf in epoch 2 on rank 1$"):
        check_outcome(report, None)
    bad = failure_report(InputError("images: 3 too few"), rank=0)
    with pytest.raises(InputError, match="images: 3 too few"):
        check_outcome(bad, None)
    assert failure_reason(bad, ["accuracy"], error=False) == "bad input: images: 3 too few"
    assert failure_report(RuntimeError("other"), rank=0) is None  # raised, not reported
    check_outcome(None, None)  # success


def test_metrics_writer_leaves_out_non_finite_values(tmp_path):
    path = write_metrics(tmp_path / "new", {"r2": float("nan"), "l0": 8.0, "x": float("inf")})
    assert json.loads(path.read_text()) == {"l0": 8.0}


SPACE = """
name: ft-diverge
kind: finetune
data: {features: digits, subset: 8}
fixed:
  backbone: resnet50
  random_init: true
  image_size: 32
  augment: none
  epochs: 2
  batch_size: 8
  eval_batch_size: 8
  lr: 100.0
  device: cpu
search:
  mono_coef: {type: categorical, choices: [0.05]}
objectives:
  - {metric: accuracy, mode: max}
  - {metric: monoscore_mean, mode: max}
sampler: {type: random, seed: 0}
budget: {num_samples: 1, max_concurrent: 1, max_failures: 1}
resources: {cpu: 1, workers: 2}
"""


@pytest.mark.timeout(600)
def test_two_worker_trial_that_diverges_is_one_failed_trial(
    ray_session, project, tmp_path, embeddings
):
    from monoray.sweep.runner import SweepOptions, run_sweep
    from monoray.sweep.search import FAIL_ATTR
    from monoray.sweep.space import load_space
    from monoray.sweep.tracking import ERROR_TAG

    path = tmp_path / "ft.yaml"
    path.write_text(SPACE)
    space = load_space(path, [f"data.embeddings={embeddings}"])
    result = run_sweep(space, SweepOptions(name="ft-diverge", progress=False))
    assert (result.n_complete, result.n_failed, result.interrupted) == (0, 1, False)

    import optuna

    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs[FAIL_ATTR]
    assert reason.startswith("diverged: ") and "epoch 2 (" in reason and "rank 0, 1" in reason
    client = MlflowClient(result.tracking_uri)
    (run,) = client.search_runs(
        [result.experiment_id], filter_string="tags.`monoray.role` = 'trial'"
    )
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG] == reason
    # Not retried: no Tune error, one Train run that kept its finished epoch.
    assert not list(result.ray_dir.glob("**/error.txt"))
    (train_run,) = (result.ray_dir / "train-runs").glob("trial-*")
    assert sorted(p.name for p in train_run.glob("epoch-*")) == ["epoch-0001"]


SAE_DIVERGE = ["train", "--arch", "batchtopk", "--features", "digits", "--k", "8", "--d-sae", "128"]
SAE_DIVERGE += ["--epochs", "2", "--batch-size", "2000", "--lr", "1e16", "--no-progress"]


@pytest.mark.timeout(600)
def test_sae_workers_divergence_is_one_line_exit_3_and_keeps_finished_epochs(
    ray_session, tmp_path, capsys
):
    out = tmp_path / "sae-w2"
    rc = main([*SAE_DIVERGE, "--workers", "2", "--out", str(out)])
    captured = capsys.readouterr()
    line = _assert_diverged(rc, captured.err, "train")
    assert captured.err == line + "\n"
    assert _epochs(out) == ["epoch-0001"]
    assert not (out / METRICS_FILE).exists()


SAE_SPACE = """
name: sae-diverge
kind: sae
data: {features: digits}
fixed: {arch: batchtopk, k: 8, d_sae: 128, epochs: 2, batch_size: 2000, lr: 1.0e16, device: cpu}
search:
  mono_coef: {type: categorical, choices: [0.0]}
sampler: {type: random, seed: 0}
baseline: false
budget: {num_samples: 1, max_concurrent: 1, max_failures: 1}
resources: {cpu: 1, workers: 2}
"""


@pytest.mark.slow  # ~60 s; `make test` has the 2-worker finetune sweep and the 2-worker SAE CLI cases
@pytest.mark.timeout(600)
def test_two_worker_sae_trial_that_diverges_is_one_failed_trial(ray_session, project, tmp_path):
    from monoray.sweep.runner import SweepOptions, run_sweep
    from monoray.sweep.search import FAIL_ATTR
    from monoray.sweep.space import load_space
    from monoray.sweep.tracking import ERROR_TAG

    path = tmp_path / "sae.yaml"
    path.write_text(SAE_SPACE)
    result = run_sweep(load_space(path), SweepOptions(name="sae-diverge", progress=False))
    assert (result.n_complete, result.n_failed, result.interrupted) == (0, 1, False)

    import optuna

    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs[FAIL_ATTR]
    assert reason.startswith("diverged: ") and "epoch 2" in reason, reason
    client = MlflowClient(result.tracking_uri)
    (run,) = client.search_runs(
        [result.experiment_id], filter_string="tags.`monoray.role` = 'trial'"
    )
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG] == reason
    assert not list(result.ray_dir.glob("**/error.txt"))  # not retried
