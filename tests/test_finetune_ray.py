"""Finetune runs end to end on real Ray: a Tune sweep of 2-worker gloo TorchTrainer trials
(both backbones) recorded in MLflow, resume after SIGKILL of a Train worker, and the
in-process `monoray finetune` CLI with --resume. Digits images, a few dozen, 32 px."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from monoray.extract.encoders import EncoderSpec
from monoray.extract.pipeline import ExtractConfig, extract
from monoray.finetune.config import FinetuneConfig
from monoray.finetune.trial import fit_distributed

pytestmark = pytest.mark.integration

SPACE = """
name: ft-test
kind: finetune
data: {features: digits, subset: 24}
fixed:
  random_init: true
  image_size: 32
  augment: none
  epochs: 1
  batch_size: 12
  eval_batch_size: 24
  lr: 0.01
  device: cpu
search:
  backbone: {type: categorical, choices: [resnet50, clip-vit-b32]}
  mono_coef: {type: loguniform, low: 0.01, high: 0.1}
objectives:
  - {metric: accuracy, mode: max}
  - {metric: monoscore_mean, mode: max}
sampler: {type: random, seed: 0}
budget: {num_samples: 2, max_concurrent: 1, max_failures: 0}
resources: {cpu: 1, workers: 2}
baseline:
  enabled: true
  params: {backbone: resnet50}
"""


@pytest.fixture(scope="module")
def digits_embeddings(tmp_path_factory) -> Path:
    """Embeddings of all 1797 digits from the extraction pipeline (a small random-init encoder)."""
    out = tmp_path_factory.mktemp("emb") / "digits"
    spec = EncoderSpec("vit-ti16", "random-init", image_size=16, device="cpu")
    extract(
        ExtractConfig(
            encoder=spec, images="digits", out=out, batch_size=512, loader_workers=0, progress=False
        )
    )
    return out


@pytest.mark.slow  # ~95 s (two full-size backbones); `make test` sweeps finetune on 2 workers in
# test_run_contract.py and trains both backbones in test_finetune_model.py
def test_sweep_runs_both_backbones_on_two_gloo_workers(
    ray_session, project, tmp_path, digits_embeddings
):
    from monoray.sweep.runner import SweepOptions, run_sweep
    from monoray.sweep.space import load_space

    path = tmp_path / "ft.yaml"
    path.write_text(SPACE)
    space = load_space(path, [f"data.embeddings={digits_embeddings}"])
    result = run_sweep(space, SweepOptions(name="ft-test", progress=False))
    assert (result.n_complete, result.n_failed, result.interrupted) == (2, 0, False)
    assert result.pareto is not None

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([result.experiment_id], filter_string="tags.`monoray.role` = 'trial'")
    assert sorted(r.data.params["backbone"] for r in runs) == ["clip-vit-b32", "resnet50"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("accuracy", "top5", "monoscore_mean", "purity_binary", "train_mono"):
            assert key in run.data.metrics, key
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in history] == [1]  # one epoch, logged once
        names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert {"checkpoint/model.safetensors", "checkpoint/monoscore_profile.json"} <= names
    baseline = next(r for r in runs if r.data.params["mono_coef"] == "0.0")
    assert baseline.data.metrics["train_mono"] == 0.0
    train_runs = list((result.ray_dir / "train-runs").glob("trial-*/epoch-0001/checkpoint.json"))
    assert len(train_runs) == 2


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


@pytest.mark.slow  # ~65 s; the same worker-kill resume runs for SAE workers in test_train_workers_ray.py
def test_train_worker_killed_mid_run_resumes_from_the_epoch_checkpoint(
    ray_session, tmp_path, digits_embeddings
):
    cfg = FinetuneConfig.from_dict(
        {
            "backbone": "resnet50",
            "embeddings": str(digits_embeddings),
            "random_init": True,
            "image_size": 32,
            "augment": "none",
            "subset": 16,
            "epochs": 3,
            "batch_size": 8,
            "eval_batch_size": 16,
            "mono_coef": 0.05,
            "lr": 0.01,
            "device": "cpu",
        }
    )
    status_dir, killed, done = tmp_path / "status", [], threading.Event()
    killer = threading.Thread(
        target=_kill_rank_after_first_epoch, args=(status_dir, 1, done, killed), daemon=True
    )
    killer.start()
    try:
        result = fit_distributed(
            cfg,
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
    assert result.metrics["epoch"] == 3
    assert result.metrics["resumed_from_epoch"] >= 1  # the restarted group resumed, not restarted
    restarted = json.loads((status_dir / "rank-1.json").read_text())
    assert restarted["pid"] != killed[0]["pid"] and restarted["resumed_from_epoch"] >= 1
    record = json.loads((Path(result.checkpoint.path) / "checkpoint.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1.0, 2.0, 3.0]


def test_cli_trains_in_process_and_resumes(tmp_path, digits_embeddings, capsys):
    from monoray.cli import main

    out = tmp_path / "run"
    args = ["finetune", "--backbone", "clip-vit-b32", "--random-init", "--images", "digits"]
    args += ["--embeddings", str(digits_embeddings), "--out", str(out), "--image-size", "32"]
    args += ["--subset", "12", "--batch-size", "6", "--augment", "none", "--device", "cpu"]
    args += ["--mono-coef", "0.05", "--lr", "0.01"]
    assert main([*args, "--epochs", "1"]) == 0
    assert (out / "checkpoints" / "epoch-0001" / "model.safetensors").is_file()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) >= {"accuracy", "monoscore_mean", "purity_binary"}
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    record = json.loads((out / "checkpoints" / "epoch-0002" / "checkpoint.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1.0, 2.0]
    assert record["config"]["backbone"] == "clip-vit-b32"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == 2.0
