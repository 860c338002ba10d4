"""Checkpoints: safetensors + JSON round trip, atomic layout, checksums and fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from monoray.errors import InputError
from monoray.runs.checkpoint import load_checkpoint, save_checkpoint


def _model_and_optimizer(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 6))
    model.register_buffer("counter", torch.arange(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=6.25e-10)
    for _ in range(steps):
        x = torch.randn(8, 6)
        opt.zero_grad()
        ((model(x) - x) ** 2).mean().backward()
        opt.step()
    return model, opt


def _save(root: Path, epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    return save_checkpoint(
        root,
        epoch=epoch,
        step=10 * epoch,
        config={"arch": "toy", "lr": 1e-3},
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        history=[{"epoch": float(e), "r2": 0.5 + e / 10} for e in range(1, epoch + 1)],
        eval_tensors={"monoscore": torch.linspace(0, 1, 4, dtype=torch.float64)},
        data={"features": "digits", "val_features": None, "seed": 0, "val_fraction": 0.2},
    )


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    record = json.loads((path / "checkpoint.json").read_text())
    assert record["schema_version"] == 1 and record["monoray_version"]
    assert set(record["sha256"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "eval.safetensors",
    }
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.epoch == 1 and ckpt.step == 10
    assert ckpt.config == {"arch": "toy", "lr": 1e-3} and ckpt.history[-1]["r2"] == 0.6
    assert ckpt.data["features"] == "digits"
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v)
    # A fresh model + optimizer loaded from the checkpoint takes the very same next step.
    model2, opt2 = _model_and_optimizer(steps=0)
    model2.load_state_dict(ckpt.model_state)
    opt2.load_state_dict(ckpt.optimizer_state)
    x = torch.randn(8, 6)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        ((m(x) - x) ** 2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    # Loading an epoch directory directly (as Ray Tune hands it back) works too.
    assert load_checkpoint(path).epoch == 1


def test_keeps_last_two_and_falls_back_from_a_damaged_latest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _model_and_optimizer()
    for epoch in (1, 2, 3):
        _save(tmp_path, epoch, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002", "epoch-0003", "latest"]
    assert (tmp_path / "latest").read_text() == "epoch-0003"
    data = bytearray((tmp_path / "epoch-0003" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "epoch-0003" / "model.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="monoray.runs.checkpoint"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.epoch == 2
    assert "does not match its sha256" in caplog.text
    (tmp_path / "epoch-0002" / "checkpoint.json").write_text("{not json")
    with pytest.raises(InputError, match="no intact checkpoint"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "nothing-here") is None


def test_an_interrupted_save_leaves_the_previous_checkpoint_current(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    # A crash mid-save leaves a temp dir, and a crash after the rename but before `latest`
    # moved leaves an epoch dir nobody points at: neither confuses the next run.
    (tmp_path / ".tmp-epoch-0002-999999").mkdir()
    (tmp_path / ".tmp-epoch-0002-999999" / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path).epoch == 1
    _save(tmp_path, 2, model, opt)
    assert not (tmp_path / ".tmp-epoch-0002-999999").exists()
    assert load_checkpoint(tmp_path).epoch == 2
    # Saving an earlier epoch again (a resume from epoch 1) drops the newer, abandoned ones.
    _save(tmp_path, 1, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001", "latest"]
