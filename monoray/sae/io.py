"""The SAE artifact: a trained SAE as `sae.safetensors` + `cfg.json`, ready for encode/decode.

    save_sae(sae, "runs/bt/sae", normalisation=InputNormalisation(applied="unit"))
    art = read_sae("runs/bt/sae")            # or "runs:/<run id>/sae", "models:/monoray-x/1"
    latents = art.sae.encode(art.prepare(x))  # x: raw feature rows, as the features were stored

`cfg.json` holds the artifact's own schema and monoray version, the architecture
and SAE config, the input normalisation, BatchTopK / Matryoshka's inference
threshold, where and how long it was trained, and the sha256 of
`sae.safetensors` (every parameter and buffer of the module). It does not depend
on the training-checkpoint layout. Loading never unpickles: JSON and
safetensors only; a missing, damaged or foreign file is one `InputError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from monoray.errors import InputError
from monoray.runs.files import atomic_write_bytes, sha256_file
from monoray.sae import (
    SparseAutoencoder,
    build_sae,
    config_from_dict,
    config_to_dict,
    drop_unused,
)
from monoray.sae.inputs import NORMALIZE, normalize_inputs

ARTIFACT_FORMAT = "monoray-sae"
"""`cfg.json`'s `format`: tells this artifact from other cfg.json files (SAELens's)."""
ARTIFACT_SCHEMA_VERSION = 1
"""Layout version of `cfg.json`."""
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
"""Sources read through MLflow (`mlflow.artifacts.download_artifacts`)."""


@dataclass(frozen=True, slots=True)
class InputNormalisation:
    """What the SAE's inputs are: the stored features, then monoray's per-row step."""

    applied: str
    """Done by monoray to every row before `encode` (`TrainConfig.normalize`): "unit" (each
    row scaled to L2 norm 1) or "none"; `SAEArtifact.prepare` does it."""
    features: str = "none"
    """Already in the stored features (`StoreHeader.normalisation`)."""
    encoder: str = ""
    """Model (and layer) that produced the features (`StoreHeader.encoder`)."""

    def __post_init__(self) -> None:
        if self.applied not in NORMALIZE:
            raise InputError(
                f"normalisation must be one of {', '.join(NORMALIZE)}, got {self.applied!r}"
            )


@dataclass(frozen=True, slots=True)
class SAEArtifact:
    """A loaded artifact: the SAE (eval mode) and what `cfg.json` says about it."""

    sae: SparseAutoencoder
    normalisation: InputNormalisation
    monoray_version: str
    """Version of monoray that wrote it."""
    epoch: int | None = None
    """Epochs trained (None: not recorded)."""
    data: dict[str, Any] | None = None
    """`DataSource.to_dict()` of the data it was trained on, for `monoray inspect`."""

    def prepare(self, x: Tensor) -> Tensor:
        """[B, d_in] raw feature rows -> the SAE's input (the recorded normalisation)."""
        return normalize_inputs(x, self.normalisation.applied)


def inference_threshold(sae: SparseAutoencoder) -> float | None:
    """BatchTopK / Matryoshka: the threshold `encode` keeps activations above; else None."""
    threshold = getattr(sae, "threshold", None)
    return float(threshold.clamp_min(0)) if isinstance(threshold, Tensor) else None


def save_sae(
    sae: SparseAutoencoder,
    directory: str | Path,
    *,
    normalisation: InputNormalisation,
    epoch: int | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write `directory/` (`sae.safetensors` + `cfg.json`) atomically; returns it.

    An existing artifact there is replaced; any other non-empty directory is refused."""
    from monoray import __version__

    final = Path(directory)
    if final.exists() and not final.is_dir():
        raise InputError(f"{final}: exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not (final / CFG_FILE).is_file():
        raise InputError(f"{final}/: exists and is not an SAE artifact; not overwriting it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sae.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    with open(tmp / WEIGHTS_FILE, "rb") as f:
        os.fsync(f.fileno())
    record = {
        "format": ARTIFACT_FORMAT,
        "schema_version": ARTIFACT_SCHEMA_VERSION,
        "monoray_version": __version__,
        "architecture": sae.cfg.arch,
        "sae": drop_unused(config_to_dict(sae.cfg)),  # the fields its architecture reads
        "normalisation": dataclasses.asdict(normalisation),
        "inference_threshold": inference_threshold(sae),
        "epoch": epoch,
        "data": data,
        "sha256": {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)},
    }
    atomic_write_bytes(tmp / CFG_FILE, json.dumps(record, indent=1).encode())
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_sae(source: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE of an artifact (a directory, or an MLflow URI), in eval mode on `device`."""
    return read_sae(source, device=device).sae


def read_sae(
    source: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> SAEArtifact:
    """Load an artifact from a directory holding `cfg.json` + `sae.safetensors`, or from an
    MLflow URI (`runs:/...`, `models:/...`, `mlflow-artifacts:/...`; `tracking_uri` or
    MLflow's default) downloaded to a temporary directory first."""
    text = str(source)
    if not text.startswith(URI_SCHEMES):
        return _read_dir(Path(source), device)
    with tempfile.TemporaryDirectory(prefix="monoray-sae-") as tmp:
        return _read_dir(artifact_dir(download(text, Path(tmp), tracking_uri), text), device)


def download(uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download an MLflow artifact URI into `dst`; failures are one `InputError` line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # MLflow resolves models:/ through the registry and tracking URIs of its environment
    # (`tracking_uri` alone leaves a stray ./mlflow.db), and draws a bar on stderr.
    env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if tracking_uri is not None:
        env |= {"MLFLOW_REGISTRY_URI": tracking_uri, "MLFLOW_TRACKING_URI": tracking_uri}
    try:
        with _environ(env):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri
            )
    except (MlflowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{uri}: cannot download the SAE artifact ({first})") from None
    return Path(local)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_dir(root: Path, where: str) -> Path:
    """The one directory under `root` holding `cfg.json` next to `sae.safetensors`."""
    if root.is_file():
        root = root.parent
    found = sorted(p.parent for p in root.rglob(CFG_FILE) if (p.parent / WEIGHTS_FILE).is_file())
    if not found:
        raise InputError(f"{where}: no SAE artifact ({CFG_FILE} next to {WEIGHTS_FILE}) in it")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise InputError(f"{where}: {len(found)} SAE artifacts in it ({names}); name one")
    return found[0]


def _read_dir(path: Path, device: str | torch.device) -> SAEArtifact:
    where = f"{path}/"
    record = _read_record(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"{where}: missing {WEIGHTS_FILE}")
    expected = record.get("sha256", {})
    if not isinstance(expected, dict) or sha256_file(weights) != expected.get(WEIGHTS_FILE):
        raise InputError(f"{where}: {WEIGHTS_FILE} does not match its sha256 (damaged file)")
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise InputError(f"{where}: unreadable {WEIGHTS_FILE} ({err})") from None
    try:
        norm = record["normalisation"]
        normalisation = InputNormalisation(
            applied=norm["applied"],
            features=str(norm.get("features", "none")),
            encoder=str(norm.get("encoder", "")),
        )
        cfg = config_from_dict(record["sae"])
        epoch = record.get("epoch")
        epoch = None if epoch is None else int(epoch)
    except InputError as err:
        raise InputError(f"{where}{CFG_FILE}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{where}{CFG_FILE}: malformed ({type(err).__name__}: {err})") from None
    if record.get("architecture") != cfg.arch:
        raise InputError(
            f"{where}{CFG_FILE}: architecture {record.get('architecture')!r} does not match "
            f"its SAE config ({cfg.arch!r})"
        )
    sae = build_sae(cfg)
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise InputError(
            f"{where}{WEIGHTS_FILE}: does not fit a {cfg.arch} SAE ({detail})"
        ) from None
    return SAEArtifact(
        sae=sae.to(device).eval(),
        normalisation=normalisation,
        monoray_version=str(record.get("monoray_version", "")),
        epoch=epoch,
        data=record.get("data"),
    )


def _read_record(path: Path) -> dict[str, Any]:
    where = f"{path}/"
    if not path.is_dir():
        raise InputError(f"{path}: no such directory")
    try:
        record = json.loads((path / CFG_FILE).read_text())
    except FileNotFoundError:
        raise InputError(f"{where}: not an SAE artifact (no {CFG_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{where}: unreadable {CFG_FILE} ({err})") from None
    if not isinstance(record, dict) or record.get("format") != ARTIFACT_FORMAT:
        raise InputError(
            f"{where}{CFG_FILE}: not a monoray SAE artifact (no format {ARTIFACT_FORMAT!r})"
        )
    version = record.get("schema_version")
    if not isinstance(version, int) or version > ARTIFACT_SCHEMA_VERSION or version < 1:
        raise InputError(
            f"{where}{CFG_FILE}: artifact schema {version!r} is not supported "
            f"(this monoray reads 1 to {ARTIFACT_SCHEMA_VERSION})"
        )
    return record
