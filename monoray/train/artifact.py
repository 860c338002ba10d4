"""A run's SAE artifact: `<run>/sae/` (`monoray.sae.io`), written when a run ends.

`open_run_sae` is what `monoray inspect` and `monoray export` read: an artifact
directory, a run directory holding `sae/`, an MLflow URI, or (a run made before
the artifact existed) the run's newest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monoray.data import StoreHeader
from monoray.errors import InputError
from monoray.runs.checkpoint import Checkpoint, load_checkpoint
from monoray.sae import SparseAutoencoder, build_sae, drop_unused
from monoray.sae.io import (
    CFG_FILE,
    URI_SCHEMES,
    InputNormalisation,
    SAEArtifact,
    read_sae,
    save_sae,
)
from monoray.train.config import TrainConfig

SAE_DIR = "sae"
"""Subdirectory of a run directory that holds its SAE artifact."""


def run_normalisation(cfg: TrainConfig, header: StoreHeader | None) -> InputNormalisation:
    """What the run's SAE inputs are: the stored features (`header`), then `cfg.normalize`."""
    if header is None:
        return InputNormalisation(applied=cfg.normalize)
    return InputNormalisation(
        applied=cfg.normalize, features=header.normalisation, encoder=header.encoder
    )


def write_run_sae(
    out_dir: Path,
    sae: SparseAutoencoder,
    cfg: TrainConfig,
    header: StoreHeader | None,
    *,
    epoch: int,
    data: dict[str, Any] | None,
) -> Path:
    """`out_dir/sae/` for the SAE a run ended with."""
    return save_sae(
        sae, out_dir / SAE_DIR, normalisation=run_normalisation(cfg, header), epoch=epoch, data=data
    )


def sae_of_checkpoint(ckpt: Checkpoint, header: StoreHeader | None = None) -> SAEArtifact:
    """The SAE a training checkpoint holds, as an artifact (eval mode, CPU)."""
    cfg = TrainConfig.from_dict(drop_unused(ckpt.config))
    sae = build_sae(cfg.sae)
    sae.load_state_dict(ckpt.model_state)
    return SAEArtifact(
        sae=sae.eval(),
        normalisation=run_normalisation(cfg, header),
        monoray_version=ckpt.monoray_version,
        epoch=ckpt.epoch,
        data=ckpt.data,
    )


def open_run_sae(source: str | Path, *, tracking_uri: str | None = None) -> SAEArtifact:
    """The SAE of an artifact dir, a run dir (its `sae/`, else its newest checkpoint: runs
    made before the artifact) or an MLflow URI (from `tracking_uri`)."""
    text = str(source)
    if text.startswith(URI_SCHEMES):
        return read_sae(text, tracking_uri=tracking_uri)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such directory")
    for candidate in (path, path / SAE_DIR):
        if (candidate / CFG_FILE).is_file():
            return read_sae(candidate)
    ckpt = load_checkpoint(path, with_optimizer=False)
    if ckpt is None:
        raise InputError(f"{path}: no SAE artifact ({SAE_DIR}/) and no checkpoint")
    return sae_of_checkpoint(ckpt)
