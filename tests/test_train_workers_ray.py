"""SAE runs on Ray Train workers end to end: `monoray train --workers 2` (gloo) writes the
in-process run directory (its `sae/` too) and resumes at W = 1 with the single-process result; a sweep with
`resources.workers: 2` records like a 1-worker sweep; a SIGKILLed worker resumes from the
last epoch checkpoint with the uninterrupted result; bad worker settings are one line,
exit 2, before anything starts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_sae_artifact_run import assert_artifact_is_final_checkpoint
from test_sweep_integration import assert_consistent, small_space

from monoray.cli import main
from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint
from monoray.sweep.runner import SweepOptions, run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TRAIN = ["train", "--arch", "batchtopk", "--features", "digits", "--d-sae", "32", "--k", "4"]
TRAIN += ["--batch-size", "120", "--lr", "0.003", "--adam-eps", "1e-6", "--device", "cpu"]
TRAIN += ["--mono-coef", "0.1", "--mono-precision", "float64", "--no-progress"]
PARAM_ATOL = 1e-5  # float32 rounding of summed shares; see tests/test_train_distributed.py


def test_two_workers_write_the_run_dir_and_resume_at_one_worker_and_back(
    ray_session, tmp_path: Path
) -> None:
    dist, local = tmp_path / "w2", tmp_path / "w1"
    assert main([*TRAIN, "--epochs", "1", "--workers", "2", "--out", str(dist)]) == 0
    assert (dist / "metrics.json").is_file() and (dist / "monoscore_profile.png").is_file()
    assert (dist / CHECKPOINTS / "epoch-0001" / "model.safetensors").is_file()
    assert_artifact_is_final_checkpoint(dist)  # rank 0 wrote sae/
    assert main([*TRAIN, "--epochs", "2", "--resume", "--out", str(dist)]) == 0  # W = 1 now
    two = ["--epochs", "3", "--resume", "--workers", "2", "--out", str(dist)]
    assert main([*TRAIN, *two]) == 0  # W = 2 again: from the W = 1 epoch, not Train's older one
    assert main([*TRAIN, "--epochs", "3", "--out", str(local)]) == 0
    got, want = load_checkpoint(dist / CHECKPOINTS), load_checkpoint(local / CHECKPOINTS)
    assert got is not None and want is not None and got.epoch == want.epoch == 3
    assert [h["epoch"] for h in got.history] == [1.0, 2.0, 3.0]
    assert_artifact_is_final_checkpoint(dist)
    for key, ref in want.model_state.items():
        assert float((got.model_state[key] - ref).abs().max()) <= PARAM_ATOL, key
    have = json.loads((dist / "metrics.json").read_text())
    ref_metrics = json.loads((local / "metrics.json").read_text())
    assert have.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        if value is not None:
            assert have[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "3", "--batch-size", "100"], "not divisible by 3 workers"),
        (["--workers", "2", "--device", "cuda"], "needs a GPU per Train worker"),
        (["--workers", "60"], "60 workers need 60 CPU but the Ray cluster has"),
        (["--workers", "2", "--gpus-per-worker", "1"], "GPU but the Ray cluster has 0"),
    ],
)
def test_bad_worker_settings_are_one_line_before_anything_runs(
    ray_session, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main([*TRAIN, "--epochs", "1", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / CHECKPOINTS).exists() and not (out / "ray").exists()


def test_two_worker_sweep_records_like_a_one_worker_sweep(ray_session, project: Path) -> None:
    space = small_space(
        "fixed.d_sae=32",
        "fixed.epochs=2",
        "fixed.batch_size=120",
        "data.subset=600",
        "budget.max_concurrent=1",
        "resources.workers=2",
        num_samples=2,
    )
    result = run_sweep(space, SweepOptions(name="workers", progress=False))
    assert (result.n_complete, result.n_failed, result.interrupted) == (2, 0, False)
    assert result.pareto is not None
    records = assert_consistent(project, "workers", 2, epochs=2)
    client = records.client
    assert client.search_model_versions("name = 'monoray-workers'")
    for run_id in records.runs.values():
        names = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
        assert {"checkpoint/model.safetensors", "checkpoint/monoscore_profile.json"} <= names
    assert len(list((result.ray_dir / "train-runs").glob("trial-*"))) == 2


def _kill_rank_after_first_epoch(status_dir: Path, rank: int, done: threading.Event, log: list):
    """Poll the workers' status files; SIGKILL `rank` once it has reported epoch 1."""
    status = status_dir / f"rank-{rank}.json"
    while not done.is_set():
        try:
            record = json.loads(status.read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("epoch", 0) >= 1:
            os.kill(record["pid"], signal.SIGKILL)
            log.append(record)
            return
        time.sleep(0.05)


def test_killed_worker_resumes_from_the_epoch_checkpoint_with_the_same_result(
    ray_session, tmp_path: Path
) -> None:
    from monoray.data import load_features
    from monoray.train import TrainConfig, train_sae
    from monoray.train.workers import data_spec, fit_sae_workers

    flat = {"arch": "topk", "d_in": 54, "d_sae": 32, "k": 4, "epochs": 3, "batch_size": 120}
    flat |= {"lr": 3e-3, "adam_eps": 1e-6, "device": "cpu", "mono_coef": 0.1}
    flat |= {"mono_precision": "float64", "dead_steps_threshold": 3}
    cfg = TrainConfig.from_dict(flat)
    status_dir, killed, done = tmp_path / "status", [], threading.Event()
    killer = threading.Thread(
        target=_kill_rank_after_first_epoch, args=(status_dir, 1, done, killed), daemon=True
    )
    killer.start()
    try:
        result = fit_sae_workers(
            cfg,
            data_spec("digits", subset=600),
            workers=2,
            storage_path=tmp_path / "storage",
            name="kill-test",
            max_failures=2,
            status_dir=status_dir,
        )
    finally:
        done.set()
        killer.join()
    assert killed, "the worker was never killed"
    assert result.metrics["epoch"] == 3 and result.metrics["resumed_from_epoch"] >= 1
    want = train_sae(cfg, load_features("digits").head(600), out_dir=tmp_path / "one")
    for key in ("r2", "monoscore_mean", "l0", "dead_fraction", "train_loss"):
        assert result.metrics[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
