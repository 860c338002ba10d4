"""Sharded on-disk feature stores: a directory of memory-mapped `.npy` shards.

Layout of a store directory::

    header.json          StoreHeader as JSON (rewritten atomically after each shard)
    shard-00000.npy      features [rows, dim], float16 or float32
    ids-00000.npy        sample ids [rows], int64
    labels-00000.npy     class labels [rows], int64 (only when has_labels)
    ...

Every file is written under a temporary name, fsynced and renamed, and a shard
counts only once `header.json` lists it. A writer opened on an existing store
keeps the shards its header records and drops anything else, so an extraction
interrupted at any point resumes from `writer.n_samples`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from monoray.data.sharded import ShardedArray
from monoray.data.types import DTYPES, STORE_SCHEMA_VERSION, FeatureSplit, ShardInfo, StoreHeader
from monoray.data.validate import check_finite, check_labels
from monoray.errors import InputError
from monoray.runs.files import atomic_write_bytes, sha256_file

HEADER = "header.json"


def _version() -> str:
    from monoray import __version__

    return f"monoray {__version__}"


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> StoreHeader:
    """Read and check `path/header.json`; `InputError` naming the store on any problem."""
    where = f"{path}/"
    try:
        raw = json.loads((path / HEADER).read_text())
    except FileNotFoundError:
        raise InputError(f"{where}: not a feature store (no {HEADER})") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{where}: cannot read {HEADER}: {err}") from None
    try:
        header = StoreHeader.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{where}: malformed {HEADER}: {err}") from None
    if header.schema_version > STORE_SCHEMA_VERSION:
        raise InputError(
            f"{where}: store schema version {header.schema_version} is newer than this "
            f"monoray supports ({STORE_SCHEMA_VERSION})"
        )
    if header.dtype not in DTYPES:
        raise InputError(f"{where}: dtype {header.dtype!r} is not one of {', '.join(DTYPES)}")
    if header.n_samples != sum(s.rows for s in header.shards):
        raise InputError(f"{where}: header n_samples does not match the sum of shard rows")
    return header


class FeatureStoreWriter:
    """Append batches of features to a store, flushing a shard every `shard_rows` rows.

    Opening a writer on a directory that already holds a store resumes it: the
    shards its header lists are kept (after checking that encoder, dim, dtype
    and labels agree) and `n_samples` tells the producer where to continue.
    Use as a context manager, or call `close()`; until then the header says
    `complete: false` and `load_features` refuses the store.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        encoder: str,
        dim: int,
        dtype: str = "float16",
        normalisation: str = "none",
        has_labels: bool = False,
        shard_rows: int = 65536,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"{path}/: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if shard_rows < 1 or dim < 1:
            raise InputError(f"{path}/: shard_rows and dim must be >= 1")
        self.path = Path(path)
        self.shard_rows = shard_rows
        self._buf_x: list[np.ndarray] = []
        self._buf_ids: list[np.ndarray] = []
        self._buf_labels: list[np.ndarray] = []
        self._buffered = 0
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / HEADER).exists():
            old = read_header(self.path)
            want = {"encoder": encoder, "dim": dim, "dtype": dtype, "has_labels": has_labels}
            for key, value in want.items():
                if getattr(old, key) != value:
                    raise InputError(
                        f"{self.path}/: existing store has {key}={getattr(old, key)!r}, "
                        f"writer asked for {value!r}"
                    )
            self._shards = list(old.shards)
            self._extra = {**old.extra, **(extra or {})}
        else:
            self._shards = []
            self._extra = dict(extra or {})
        self._encoder, self._dim, self._dtype = encoder, dim, dtype
        self._normalisation, self._has_labels = normalisation, has_labels
        self._remove_strays()
        self._write_header(complete=False)

    @property
    def n_samples(self) -> int:
        """Rows safely on disk (in finished shards); resume the producer from here."""
        return sum(s.rows for s in self._shards)

    @property
    def header(self) -> StoreHeader:
        """The header as it stands (buffered rows not included)."""
        return self._header(complete=False)

    def append(
        self, features: np.ndarray, ids: np.ndarray, labels: np.ndarray | None = None
    ) -> None:
        """Buffer a batch [B, dim] with its ids [B] (and labels [B]); flush full shards."""
        where = f"{self.path}/"
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self._dim:
            raise InputError(f"{where}: batch has shape {features.shape}, store dim is {self._dim}")
        b = features.shape[0]
        with np.errstate(over="ignore"):
            stored = features.astype(self._dtype)
        check_finite(stored, where=where, name=f"batch (as {self._dtype})")
        ids = np.asarray(ids)
        if ids.shape != (b,) or ids.dtype.kind not in "iu":
            raise InputError(f"{where}: ids must be [{b}] integers, got {ids.shape} {ids.dtype}")
        if self._has_labels:
            if labels is None:
                raise InputError(f"{where}: store has labels but the batch has none")
            self._buf_labels.append(check_labels(labels, b, where=where))
        elif labels is not None:
            raise InputError(f"{where}: store was created without labels")
        self._buf_x.append(stored)
        self._buf_ids.append(ids.astype(np.int64))
        self._buffered += b
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def flush(self) -> None:
        """Write all buffered rows as one (possibly short) shard."""
        if self._buffered:
            self._flush(self._buffered)

    def close(self) -> StoreHeader:
        """Flush and mark the store complete; returns the final header."""
        self.flush()
        return self._write_header(complete=True)

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()

    # --- internals ----------------------------------------------------------
    def _header(self, *, complete: bool) -> StoreHeader:
        return StoreHeader(
            encoder=self._encoder,
            dim=self._dim,
            dtype=self._dtype,
            normalisation=self._normalisation,
            n_samples=self.n_samples,
            has_labels=self._has_labels,
            shards=tuple(self._shards),
            created_by=_version(),
            extra={**self._extra, "complete": complete},
        )

    def _write_header(self, *, complete: bool) -> StoreHeader:
        header = self._header(complete=complete)
        atomic_write_bytes(self.path / HEADER, json.dumps(header.to_dict(), indent=1).encode())
        return header

    def _remove_strays(self) -> None:
        keep = {HEADER}
        for s in self._shards:
            keep |= {s.features_file, s.ids_file, s.labels_file}
        for p in self.path.iterdir():
            stray = p.name.startswith(".") and ".tmp" in p.name
            stray |= p.suffix == ".npy" and p.name.split("-")[0] in ("shard", "ids", "labels")
            if stray and p.name not in keep and p.is_file():
                p.unlink()

    def _flush(self, rows: int) -> None:
        x = np.concatenate(self._buf_x)
        ids = np.concatenate(self._buf_ids)
        labels = np.concatenate(self._buf_labels) if self._has_labels else None
        info = ShardInfo(index=len(self._shards), rows=rows, sha256="")
        _atomic_save_npy(self.path / info.ids_file, ids[:rows])
        if labels is not None:
            _atomic_save_npy(self.path / info.labels_file, labels[:rows])
        _atomic_save_npy(self.path / info.features_file, np.ascontiguousarray(x[:rows]))
        info = ShardInfo(info.index, rows, sha256_file(self.path / info.features_file))
        self._shards.append(info)
        self._write_header(complete=False)
        self._buf_x, self._buf_ids = [x[rows:]], [ids[rows:]]
        self._buf_labels = [labels[rows:]] if labels is not None else []
        self._buffered -= rows


def open_store(
    path: str | Path, *, verify_checksums: bool = False
) -> tuple[StoreHeader, FeatureSplit]:
    """Open a finished store as one split (features memory-mapped, ids/labels in memory).

    Checks the header, that every shard file exists with the recorded shape
    and dtype, and that no feature is NaN/inf (a chunked scan: memory stays
    flat). `verify_checksums` also re-hashes every shard.
    """
    path = Path(path)
    where = f"{path}/"
    header = read_header(path)
    if header.extra.get("complete") is False:
        raise InputError(
            f"{where}: store is incomplete (its writer did not finish; "
            f"{len(header.shards)} shards, {header.n_samples} rows so far)"
        )
    if not header.shards:
        raise InputError(f"{where}: store has no samples")
    want = np.dtype(header.dtype)
    ids, labels = [], []
    for s in header.shards:
        try:
            x = np.load(path / s.features_file, mmap_mode="r", allow_pickle=False)
            i = np.load(path / s.ids_file, allow_pickle=False)
            lab = np.load(path / s.labels_file, allow_pickle=False) if header.has_labels else None
        except FileNotFoundError as err:
            raise InputError(f"{where}: missing shard file {Path(err.filename).name}") from None
        except (OSError, ValueError) as err:
            raise InputError(f"{where}: unreadable shard {s.index}: {err}") from None
        if x.ndim != 2:
            raise InputError(f"{where}: {s.features_file} must be 2-D, got shape {x.shape}")
        if x.shape[1] != header.dim:
            raise InputError(
                f"{where}: {s.features_file} has dim {x.shape[1]}, header says {header.dim}"
            )
        if x.shape[0] != s.rows or x.dtype != want:
            raise InputError(
                f"{where}: {s.features_file} is {x.shape[0]} rows of {x.dtype}, header says "
                f"{s.rows} rows of {header.dtype}"
            )
        if i.shape != (s.rows,):
            raise InputError(f"{where}: {s.ids_file} has shape {i.shape}, expected ({s.rows},)")
        if lab is not None and lab.shape != (s.rows,):
            raise InputError(
                f"{where}: labels has {lab.shape[0]} entries but shard {s.index} has {s.rows} rows"
            )
        if verify_checksums and sha256_file(path / s.features_file) != s.sha256:
            raise InputError(f"{where}: {s.features_file} does not match its sha256 in the header")
        ids.append(i)
        if lab is not None:
            labels.append(lab)
    paths = [path / s.features_file for s in header.shards]
    if len(paths) == 1 and want == np.float32:
        features: Any = np.load(paths[0], mmap_mode="r", allow_pickle=False)
    else:
        features = ShardedArray(paths)
    check_finite(features, where=where)
    all_ids = np.concatenate(ids).astype(np.int64)
    if np.unique(all_ids).size != all_ids.size:
        raise InputError(f"{where}: sample ids are not unique")
    all_labels = None
    if header.has_labels:
        all_labels = check_labels(np.concatenate(labels), all_ids.size, where=where)
    return header, FeatureSplit(features=features, labels=all_labels, ids=all_ids, images=None)
