"""A run that blows up with λ > 0 is a divergence, whichever check sees it first."""

from __future__ import annotations

from pathlib import Path

import pytest

from monoray.data import load_features
from monoray.runs.checkpoint import load_checkpoint
from monoray.runs.outcome import DivergedError
from monoray.train import TrainConfig, train_sae


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_inf_latents_under_monoloss_are_a_divergence(arch: str, tmp_path: Path) -> None:
    """At lr 1e30 the latents turn inf; MonoLoss' input check must not surface as bad input."""
    splits = load_features("digits").head(256)
    cfg = TrainConfig.from_dict(
        {"arch": arch, "d_in": splits.train.dim, "d_sae": 64, "k": 8, "mono_coef": 0.1}
        | {"lr": 1e30, "grad_clip": 0.0, "epochs": 2, "batch_size": 32, "device": "cpu"}
    )
    with pytest.raises(DivergedError, match=r"(loss|latents) became NaN/inf at epoch 1, step \d+"):
        train_sae(cfg, splits, out_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path) is None
