"""`monoray train` (and `inspect`) on unlabelled features: metrics without meaning (class purity) are neither
printed nor written to metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monoray.cli import main
from monoray.data import load_features


def test_unlabelled_run_omits_purity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    feats = tmp_path / "unlabelled.npz"
    np.savez(feats, features=load_features("digits").train.features)  # no labels
    out = tmp_path / "run"
    argv = ["train", "--features", str(feats), "--arch", "topk", "--d-sae", "32", "--k", "4"]
    argv += ["--epochs", "1", "--batch-size", "128", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "monoscore_mean" in text and "purity" not in text and "nan" not in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert "r2" in metrics and not any(k.startswith("purity") for k in metrics)
    assert None not in metrics.values()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "monoscore_mean" in text and "purity" not in text and " nan" not in text
