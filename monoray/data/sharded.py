"""`ShardedArray`: a lazily concatenated, read-only view over memory-mapped shards.

A feature store with millions of rows is many `.npy` shards on disk. This class
makes them look like one [N, d] float32 array for the only operations the
trainer and evaluator need (`len`, `.shape`, `x[int_array]`, `x[i:j]`) while
keeping memory flat: rows are read from the memory maps on demand, per batch.
Pickling sends the shard paths and the row index, never the data, so
`ray.put` of a split stays cheap and workers re-open the maps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_ROWS = 65536
"""Rows checked at a time, so checking a memory-mapped store keeps memory flat."""


class ShardedArray:
    """Read-only [N, d] float32 view over `.npy` shards, optionally a subset of rows.

    `paths` are the shard files in order; `rows`, if given, are indices into
    the concatenation of all shards (sorted ascending keeps reads sequential).
    Indexing returns a new in-memory float32 array (float16 shards are upcast).
    """

    __slots__ = ("_dim", "_maps", "_offsets", "_paths", "_rows", "_storage_dtype")

    def __init__(self, paths: Sequence[str | Path], rows: np.ndarray | None = None) -> None:
        self._paths = tuple(str(p) for p in paths)
        if not self._paths:
            raise ValueError("ShardedArray needs at least one shard")
        counts = []
        dims = set()
        dtypes = set()
        for p in self._paths:
            m = np.load(p, mmap_mode="r", allow_pickle=False)
            if m.ndim != 2:
                raise ValueError(f"{p}: shard must be 2-D, got shape {m.shape}")
            counts.append(m.shape[0])
            dims.add(m.shape[1])
            dtypes.add(m.dtype.str)
        if len(dims) != 1 or len(dtypes) != 1:
            raise ValueError(f"shards disagree on width or dtype: {sorted(dims)} {sorted(dtypes)}")
        self._dim = dims.pop()
        self._storage_dtype = np.dtype(dtypes.pop())
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._offsets[-1])
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= total)):
                raise ValueError(f"row index out of range for {total} rows")
        self._rows = rows
        self._maps: list[np.ndarray] | None = None

    # --- array-like surface -------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        n = int(self._offsets[-1]) if self._rows is None else int(self._rows.size)
        return (n, self._dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        """Dtype of what indexing returns (always float32)."""
        return np.dtype(np.float32)

    @property
    def storage_dtype(self) -> np.dtype:
        """Dtype of the shards on disk."""
        return self._storage_dtype

    @property
    def paths(self) -> tuple[str, ...]:
        """Shard files, in order."""
        return self._paths

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, shards={len(self._paths)}, storage={self._storage_dtype})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardedArray, (self._paths, self._rows))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[0 : len(self)]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._gather(np.array([i], dtype=np.int64))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1 and self._rows is None:
                return self._contiguous(start, stop)
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError("ShardedArray supports int, slice and 1-D integer/bool index arrays")
        idx = idx.astype(np.int64, copy=False)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} rows")
        return self._gather(idx)

    # --- helpers ------------------------------------------------------------
    def subset(self, rows: np.ndarray) -> ShardedArray:
        """A view of some of this array's rows (indices relative to this view)."""
        rows = np.asarray(rows, dtype=np.int64)
        base = rows if self._rows is None else self._rows[rows]
        return ShardedArray(self._paths, base)

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(start_row, block)` over the view in order, `chunk_rows` at a time."""
        for start in range(0, len(self), chunk_rows):
            yield start, self[start : min(start + chunk_rows, len(self))]

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self._paths]
        return self._maps

    def _contiguous(self, start: int, stop: int) -> np.ndarray:
        maps = self._open()
        out = np.empty((max(stop - start, 0), self._dim), dtype=np.float32)
        for s, m in enumerate(maps):
            lo, hi = int(self._offsets[s]), int(self._offsets[s + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out[a - start : b - start] = m[a - lo : b - lo]
        return out

    def _gather(self, local: np.ndarray) -> np.ndarray:
        maps = self._open()
        glob = local if self._rows is None else self._rows[local]
        out = np.empty((glob.size, self._dim), dtype=np.float32)
        shard = np.searchsorted(self._offsets, glob, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            out[sel] = maps[s][glob[sel] - self._offsets[s]]
        return out
