"""All-zero feature rows: kept at similarity 0 (default), dropped or refused at load; counted
in the load report and metrics.json; a sweep on such data completes; evaluation input
problems are input errors, never divergences."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monoray.cli import main
from monoray.data import FeatureSplits, load_features
from monoray.errors import InputError
from monoray.runs.outcome import DivergedError
from monoray.sweep.space import load_space
from monoray.train import TrainConfig, train_sae
from monoray.trials.sae import load_splits

REPO = Path(__file__).parents[1]
TRAIN_ZERO = list(range(0, 400, 10))  # 40 rows: 1438 -> 1398 train rows, 23 -> 22 steps at 64
VAL_ZERO = [5, 50, 100, 150, 358]
QUICK = ["--arch", "batchtopk", "--d-sae", "64", "--k", "4", "--batch-size", "64"]
QUICK += ["--lr", "3e-3", "--device", "cpu", "--mono-coef", "0.03", "--no-progress"]


@pytest.fixture(scope="module")
def zeroed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Real digits features with some rows of each split set to 0 (blank images)."""
    digits = load_features("digits")
    root = tmp_path_factory.mktemp("zeroed")
    paths = []
    for name, split, rows in (("train", digits.train, TRAIN_ZERO), ("val", digits.val, VAL_ZERO)):
        x = np.array(split.features)
        x[rows] = 0.0
        path = root / f"{name}.npz"
        np.savez(path, features=x, labels=split.labels, ids=split.ids)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(zeroed: tuple[Path, Path], out: Path, *extra: str) -> int:
    data = ["--features", str(zeroed[0]), "--val-features", str(zeroed[1])]
    return main(["train", *data, *QUICK, "--epochs", "2", "--out", str(out), *extra])


def test_load_counts_keeps_drops_or_refuses(zeroed: tuple[Path, Path]) -> None:
    kept = load_features(zeroed[0], val_source=zeroed[1])
    assert (kept.zero_rows.train, kept.zero_rows.val) == (40, 5)
    assert len(kept.train) == 1438 and len(kept.val) == 359
    dropped = load_features(zeroed[0], val_source=zeroed[1], zero_rows="drop")
    assert (dropped.zero_rows.train, dropped.zero_rows.val) == (40, 5)
    assert len(dropped.train) == 1398 and len(dropped.val) == 354
    assert np.asarray(dropped.train.features).any(axis=1).all()
    assert not set(dropped.train.ids) & set(kept.train.ids[TRAIN_ZERO])
    assert dropped.source.zero_rows == "drop"
    with pytest.raises(InputError, match=r"45 all-zero feature rows \(40 train, 5 val"):
        load_features(zeroed[0], val_source=zeroed[1], zero_rows="error")
    with pytest.raises(InputError, match="zero_rows must be one of keep, drop, error"):
        load_features("digits", zero_rows="skip")


def test_train_keeps_zero_rows_and_reports_them(
    zeroed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keep"
    assert _train(zeroed, out) == 0  # old code: "diverged" after epoch 1
    text = capsys.readouterr().out
    assert "all-zero rows: 40 train, 5 val (kept: similarity 0 with every sample)" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["step"] == 2 * 23
    assert metrics["zero_rows_train"] == 40 and metrics["zero_rows_val"] == 5
    assert metrics["val_samples"] == 359 and np.isfinite(metrics["monoscore_mean"])
    # --resume reloads the data the same way (the policy is in the checkpoint's data record)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["zero_rows_train"] == 40


def test_train_drop_removes_zero_rows(zeroed: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "drop"
    assert _train(zeroed, out, "--zero-rows", "drop") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 * 22 and metrics["val_samples"] == 354
    assert metrics["zero_rows_train"] == 40 and metrics["zero_rows_val"] == 5
    record = json.loads((out / "checkpoints" / "epoch-0002" / "checkpoint.json").read_text())
    assert record["data"]["zero_rows"] == "drop"


def test_train_error_is_one_line_at_load(
    zeroed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "error"
    assert _train(zeroed, out, "--zero-rows", "error") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "45 all-zero feature rows" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_space_data_zero_rows(zeroed: tuple[Path, Path]) -> None:
    sets = [f"data.features={zeroed[0]}", f"data.val_features={zeroed[1]}"]
    space = load_space(REPO / "search_spaces" / "demo.yaml", [*sets, "data.zero_rows=drop"])
    assert space.data.zero_rows == "drop"
    assert len(load_splits(space.data).train) == 1398
    with pytest.raises(InputError, match=r"data\.zero_rows: expected one of keep, drop, error"):
        load_space(REPO / "search_spaces" / "demo.yaml", ["data.zero_rows=skip"])


def test_evaluation_input_problem_is_an_input_error_not_a_divergence(tmp_path: Path) -> None:
    digits = load_features("digits")
    bad = np.array(digits.val.features)
    bad[7, 3] = np.inf  # bypasses load-time validation: only a library caller can do this
    splits = FeatureSplits(
        train=digits.train, val=dataclasses.replace(digits.val, features=bad), header=digits.header
    )
    cfg = TrainConfig.from_dict(
        {"arch": "topk", "d_in": 54, "d_sae": 32, "k": 4, "epochs": 1, "batch_size": 256}
    )
    with pytest.raises(InputError, match="evaluation after epoch 1: val features: contains inf"):
        train_sae(cfg, splits, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(DivergedError):  # a non-finite model is still a divergence
        train_sae(cfg.replace(lr=1e30), digits, out_dir=tmp_path / "nan", progress=False)


@pytest.mark.integration
def test_sweep_trials_on_zero_row_data_complete(
    ray_session, project: Path, zeroed: tuple[Path, Path]
) -> None:
    from mlflow.tracking import MlflowClient

    from monoray.sweep.paths import ProjectPaths
    from monoray.sweep.runner import SweepOptions, run_sweep
    from monoray.sweep.tracking import SweepRecords

    sets = [f"data.features={zeroed[0]}", f"data.val_features={zeroed[1]}"]
    sets += ["fixed.d_sae=64", "fixed.epochs=1", "fixed.batch_size=128"]
    sets += ["budget.num_samples=2", "budget.max_concurrent=2"]
    space = load_space(REPO / "search_spaces" / "demo.yaml", sets)
    result = run_sweep(space, SweepOptions(name="zeros", progress=False))
    assert (result.n_complete, result.n_failed) == (2, 0)  # old code: both "diverged"
    records = SweepRecords.load(ProjectPaths.resolve(project).tracking_uri, "zeros")
    client: MlflowClient = records.client
    for run_id in records.runs.values():
        assert client.get_run(run_id).data.metrics["zero_rows_train"] == 40


@pytest.mark.integration
def test_trial_input_error_is_failed_with_its_reason_not_retried(
    ray_session, tmp_path: Path
) -> None:
    from ray import tune

    from monoray.sweep.search import failure_reason
    from monoray.trials.sae import sae_trial

    digits = load_features("digits")
    bad = np.array(digits.val.features)
    bad[7, 3] = np.inf  # past load-time validation: found by the trial's evaluation
    splits = FeatureSplits(
        train=digits.train, val=dataclasses.replace(digits.val, features=bad), header=digits.header
    )
    config = {"arch": "topk", "d_sae": 32, "k": 4, "epochs": 1, "batch_size": 256, "device": "cpu"}
    grid = tune.Tuner(
        tune.with_parameters(sae_trial, splits=splits),
        param_space=config,
        run_config=tune.RunConfig(
            storage_path=str(tmp_path),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0,
        ),
    ).fit()
    result = grid[0]
    assert result.error is None  # no exception, so Tune neither retries nor prints a stack
    reason = failure_reason(result.metrics, ["r2", "monoscore_mean"], error=False)
    assert reason.startswith("bad input: ") and "val features: contains inf" in reason
    assert "diverged" not in result.metrics
