"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout under a run's `checkpoints/` directory::

    epoch-0002/  model.safetensors  optimizer.safetensors  eval.safetensors  checkpoint.json
    epoch-0003/  ...
    latest       text file naming the newest finished checkpoint ("epoch-0003")

`checkpoint.json` holds the schema and monoray versions, the full flat config,
epoch, global step, the metrics history, the data source and the sha256 of
each safetensors file. A checkpoint directory is written under a temporary
name and renamed into place, then `latest` is replaced atomically; the last
`keep` checkpoints are kept. Loading verifies the checksums and falls back to
an older checkpoint (with a warning) when the newest is damaged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from monoray.errors import InputError
from monoray.runs.files import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA_VERSION = 1
"""Layout version of `checkpoint.json`."""
CHECKPOINTS = "checkpoints"
"""Subdirectory of a run directory that holds its checkpoints."""
LATEST = "latest"
"""Pointer file naming the newest finished checkpoint directory."""
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")
_FILES = ("model.safetensors", "optimizer.safetensors", "eval.safetensors")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Everything one checkpoint holds, loaded to CPU."""

    path: Path
    """The checkpoint directory (`.../epoch-0003`)."""
    config: dict[str, Any]
    """The run's flat config (`TrainConfig.to_dict()`)."""
    epoch: int
    """Epochs finished (1-based: `epoch-0003` holds the state after the 3rd epoch)."""
    step: int
    """Optimizer steps taken so far."""
    history: list[dict[str, float]]
    """Per-epoch metrics, oldest first."""
    model_state: dict[str, torch.Tensor]
    """`state_dict()` of the SAE (parameters and buffers)."""
    optimizer_state: dict[str, Any] | None
    """`state_dict()` of the optimizer, rebuilt from the flat tensors, or None."""
    eval_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-latent evaluation results of this epoch (e.g. `monoscore` [d_sae])."""
    data: dict[str, Any] | None = None
    """`DataSource.to_dict()` of the data trained on, for `monoray inspect`."""
    monoray_version: str = ""
    """Version of monoray that wrote it."""


def flatten_optimizer_state(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer `state_dict()` into flat tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _write_file(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    save_file(tensors, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return sha256_file(path)


def save_checkpoint(
    root: str | Path,
    *,
    epoch: int,
    step: int,
    config: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    history: list[dict[str, float]],
    eval_tensors: dict[str, torch.Tensor] | None = None,
    data: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `root/epoch-{epoch:04d}` atomically, point `latest` at it, and
    prune to the newest `keep`. Returns the checkpoint directory."""
    from monoray import __version__

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sums = {"model.safetensors": _write_file(tmp / "model.safetensors", _cpu(model_state))}
    optim_meta = None
    if optimizer_state is not None:
        flat, optim_meta = flatten_optimizer_state(optimizer_state)
        sums["optimizer.safetensors"] = _write_file(tmp / "optimizer.safetensors", flat)
    if eval_tensors:
        sums["eval.safetensors"] = _write_file(tmp / "eval.safetensors", _cpu(eval_tensors))
    record = {
        "schema_version": CHECKPOINT_SCHEMA_VERSION,
        "monoray_version": __version__,
        "epoch": epoch,
        "step": step,
        "config": config,
        "data": data,
        "optimizer": optim_meta,
        "history": history,
        "sha256": sums,
    }
    atomic_write_bytes(
        tmp / "checkpoint.json", json.dumps(record, indent=1, allow_nan=True).encode()
    )
    if final.exists():  # left over from an interrupted run that never pointed `latest` at it
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_bytes(root / LATEST, name.encode())
    _prune(root, current=epoch, keep=keep)
    return final


def _epoch_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _EPOCH_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, *, current: int, keep: int) -> None:
    dirs = _epoch_dirs(root)
    older = [p for e, p in dirs if e <= current]
    stale = [p for e, p in dirs if e > current] + older[: max(len(older) - keep, 0)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-epoch-*"):
        if p.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(p, ignore_errors=True)


def read_checkpoint_dir(path: str | Path, *, with_optimizer: bool = True) -> Checkpoint:
    """Load one checkpoint directory, verifying every file's sha256.

    Raises `InputError` if anything is missing, damaged or of a newer schema.
    """
    path = Path(path)
    where = f"{path}/"
    try:
        record = json.loads((path / "checkpoint.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{where}: not a checkpoint (no checkpoint.json)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{where}: unreadable checkpoint.json ({err})") from None
    if not isinstance(record, dict) or "sha256" not in record or "config" not in record:
        raise InputError(f"{where}: malformed checkpoint.json")
    if int(record.get("schema_version", 0)) > CHECKPOINT_SCHEMA_VERSION:
        raise InputError(
            f"{where}: checkpoint schema {record['schema_version']} is newer than this monoray "
            f"supports ({CHECKPOINT_SCHEMA_VERSION})"
        )
    sums: dict[str, str] = record["sha256"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for fname in _FILES:
        if fname not in sums or (fname == "optimizer.safetensors" and not with_optimizer):
            continue
        fpath = path / fname
        if not fpath.exists():
            raise InputError(f"{where}: missing {fname}")
        if sha256_file(fpath) != sums[fname]:
            raise InputError(f"{where}: {fname} does not match its sha256 (damaged file)")
        try:
            loaded[fname] = load_file(str(fpath), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise InputError(f"{where}: unreadable {fname} ({err})") from None
    if "model.safetensors" not in loaded:
        raise InputError(f"{where}: checkpoint has no model.safetensors")
    optim = None
    if "optimizer.safetensors" in loaded and record.get("optimizer"):
        optim = unflatten_optimizer_state(loaded["optimizer.safetensors"], record["optimizer"])
    return Checkpoint(
        path=path,
        config=record["config"],
        epoch=int(record["epoch"]),
        step=int(record["step"]),
        history=list(record.get("history", [])),
        model_state=loaded["model.safetensors"],
        optimizer_state=optim,
        eval_tensors=loaded.get("eval.safetensors", {}),
        data=record.get("data"),
        monoray_version=str(record.get("monoray_version", "")),
    )


def find_checkpoint_root(path: str | Path) -> Path:
    """`path` itself if it holds checkpoints, else `path/checkpoints`."""
    path = Path(path)
    if (path / LATEST).exists() or _epoch_dirs(path):
        return path
    return path / CHECKPOINTS


def load_checkpoint(path: str | Path, *, with_optimizer: bool = True) -> Checkpoint | None:
    """Load the newest intact checkpoint under `path`.

    `path` may be a checkpoint directory (`epoch-0003/`, or one Ray Tune
    copied), a `checkpoints/` directory, or a run directory containing one.
    Candidates are tried newest first (`latest`, then every `epoch-*`
    descending); a damaged one is skipped with a warning. Returns None when
    there is no checkpoint at all; raises `InputError` when all are damaged.
    """
    path = Path(path)
    if (path / "checkpoint.json").exists():
        return read_checkpoint_dir(path, with_optimizer=with_optimizer)
    root = find_checkpoint_root(path)
    candidates: list[Path] = []
    try:
        name = (root / LATEST).read_text().strip()
        if _EPOCH_DIR.match(name):
            candidates.append(root / name)
    except OSError:
        pass
    candidates += [p for _, p in reversed(_epoch_dirs(root)) if p not in candidates]
    if not candidates:
        return None
    problems = []
    for cand in candidates:
        try:
            ckpt = read_checkpoint_dir(cand, with_optimizer=with_optimizer)
        except InputError as err:
            log.warning("skipping damaged checkpoint: %s", err)
            problems.append(str(err))
            continue
        if problems:
            log.warning("resuming from older checkpoint %s", cand)
        return ckpt
    raise InputError(f"{root}/: no intact checkpoint ({problems[0]})")
