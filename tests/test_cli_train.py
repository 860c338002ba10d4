"""`monoray train` and `monoray inspect` end to end on digits; bad input -> one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from monoray.cli import main
from monoray.data import load_features

METRIC_KEYS = {
    "r2",
    "explained_variance",
    "l0",
    "dead_fraction",
    "monoscore_mean",
    "monoscore_mean_active",
    "purity_binary",
    "purity_weighted",
}
QUICK = ["--d-sae", "64", "--k", "4", "--batch-size", "64", "--lr", "3e-3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_resume_and_inspect_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text("arch: batchtopk\nmono_coef: 1.0e-3\nepochs: 5\nthreshold_ema: 0.95\n")
    argv = ["train", "--features", "digits", "--config", str(config)]
    assert main([*argv, *QUICK, "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    assert "purity_binary" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS and metrics["epoch"] == 2
    assert (out / "monoscore_profile.png").stat().st_size > 1000
    record = json.loads((out / "checkpoints" / "epoch-0002" / "checkpoint.json").read_text())
    assert record["config"]["mono_coef"] == 1e-3 and record["config"]["d_sae"] == 64
    assert record["config"]["threshold_ema"] == 0.95 and record["config"]["epochs"] == 2
    assert record["monoray_version"] and record["data"]["features"] == "digits"

    # --resume takes the run's config from its checkpoint; flags given override it.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 0
    capsys.readouterr()
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["epoch"] == 3 and resumed["step"] == 3 * 23

    png = tmp_path / "grid.png"
    assert main(["inspect", str(out), "--latents", "3", "17", "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert "latent 3 " in text and "latent 17 " in text and "top" in text and "bottom" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(out), "--top-ranked", "2"]) == 0
    assert (out / "inspect.png").exists()


def test_inspect_without_images_prints_ids_and_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digits = load_features("digits")
    feats = tmp_path / "feats.npz"
    np.savez(
        feats, features=digits.train.features, labels=digits.train.labels, ids=digits.train.ids
    )
    out = tmp_path / "run"
    argv = ["train", "--features", str(feats), "--arch", "topk", *QUICK, "--epochs", "1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank " in text and ":y=" in text and not (out / "inspect.png").exists()
    assert main(["inspect", str(out), "--latents", "999"]) == 2
    assert "--latents: 999 is out of range (d_sae is 64)" in capsys.readouterr().err


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    x = np.ones((50, 8), np.float32)
    x[[17, 30], 3] = np.nan
    np.savez(tmp_path / "nan.npz", features=x)
    return {
        "missing": (
            ["--arch", "topk", "--features", str(tmp_path / "nope.npz")],
            "nope.npz: no such file or directory",
        ),
        "nan": (
            ["--arch", "topk", "--features", str(tmp_path / "nan.npz")],
            "'features' has NaN in 2 rows (first: row 17)",
        ),
        "dim": (
            ["--arch", "topk", "--d-in", "768"],
            "digits: dim 54 does not match the config's d_in 768",
        ),
        "k": (["--arch", "topk", "--k", "300", "--d-sae", "128"], "k 300 is larger than d_sae 128"),
        "arch": (["--arch", "resnet"], "argument --arch: invalid choice: 'resnet'"),
    }


def _check_one_line(name: str, err: str, expected: str) -> None:
    assert "Traceback" not in err, (name, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monoray train: error: "), (name, err)
    assert expected in lines[0], (name, err)


def test_bad_inputs_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _bad_input_cases(tmp_path)
    out = ["--out", str(tmp_path / "run")]
    # The real entry point in a fresh process for two cases (an InputError from the data
    # layer, an argparse error), side by side: each process pays the torch import once.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "monoray", "train", *cases[name][0], *out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("nan", "arch")
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        _check_one_line(name, err, cases[name][1])
    # Every case through the same `main` in this process (same code path, no import cost).
    for name, (args, expected) in cases.items():
        try:
            code = main(["train", *args, *out])
        except SystemExit as exc:  # argparse errors exit from inside parse_args
            code = int(exc.code)
        assert code == 2, name
        _check_one_line(name, capsys.readouterr().err, expected)
    assert not (tmp_path / "run").exists()
