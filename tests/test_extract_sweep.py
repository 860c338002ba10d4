"""Extraction feeds the sweep service: a store made by `extract` is swept like any feature set."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from monoray.extract import EncoderSpec, ExtractConfig, extract
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.space import load_space

pytestmark = pytest.mark.integration


def test_sweep_on_an_extracted_store(ray_session, project: Path, tmp_path: Path) -> None:
    store = tmp_path / "features"
    spec = EncoderSpec("vit-ti16", "random-init", image_size=32)
    extract(
        ExtractConfig(
            encoder=spec,
            images="digits",
            out=store,
            limit=96,
            batch_size=32,
            shard_rows=64,
            loader_workers=0,
            progress=False,
        )
    )
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "name": "extracted",
                "data": {"features": "features"},  # relative to the space file
                "fixed": {"arch": "batchtopk", "d_sae": 64, "k": 4, "epochs": 1, "batch_size": 16},
                "search": {"mono_coef": {"type": "loguniform", "low": 1e-3, "high": 0.1}},
                "budget": {"num_samples": 2, "max_concurrent": 2},
            }
        )
    )
    space = load_space(space_file)
    assert space.data.features == str(store)
    result = run_sweep(space, SweepOptions(progress=False))
    assert result.n_complete == 2 and not result.interrupted
    study = optuna.load_study(
        study_name="extracted", storage=ProjectPaths.resolve(project).optuna_url
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert all(len(t.values) == 2 for t in study.trials)
