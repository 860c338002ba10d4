"""Input checks shared by every loader: each failure is one `InputError` line
naming the file and the problem."""

from __future__ import annotations

import numpy as np

from monoray.data.sharded import CHUNK_ROWS, ShardedArray
from monoray.data.types import FeatureArray
from monoray.errors import InputError


def check_features(features: FeatureArray, *, where: str, name: str = "'features'") -> FeatureArray:
    """Check rank, emptiness, dtype and finiteness; return the array as float32.

    In-memory arrays are cast to float32 (integer pixel values are fine);
    memory maps and `ShardedArray`s are returned as they are.
    """
    if features.ndim != 2:
        raise InputError(f"{where}: {name} must be 2-D [N, d], got shape {tuple(features.shape)}")
    n, d = features.shape
    if n == 0:
        raise InputError(f"{where}: {name} has no rows")
    if d == 0:
        raise InputError(f"{where}: {name} has width 0")
    if not isinstance(features, ShardedArray):
        kind = features.dtype.kind
        if kind not in "fiub":
            raise InputError(f"{where}: {name} must be numeric, got dtype {features.dtype}")
        if not isinstance(features, np.memmap) and features.dtype != np.float32:
            features = np.ascontiguousarray(features, dtype=np.float32)
    check_finite(features, where=where, name=name)
    return features


def check_finite(features: FeatureArray, *, where: str, name: str = "'features'") -> None:
    """Raise if any row has NaN or inf, naming the count and the first bad row."""
    n_nan = n_inf = 0
    first = -1
    for start in range(0, features.shape[0], CHUNK_ROWS):
        block = np.asarray(features[start : start + CHUNK_ROWS])
        if block.dtype.kind not in "fc":
            return
        bad_nan = np.isnan(block).any(axis=1)
        bad_inf = np.isinf(block).any(axis=1)
        bad = bad_nan | bad_inf
        if bad.any():
            n_nan += int(bad_nan.sum())
            n_inf += int((bad_inf & ~bad_nan).sum())
            if first < 0:
                first = start + int(np.flatnonzero(bad)[0])
    if first >= 0:
        what = "NaN" if n_inf == 0 else "inf" if n_nan == 0 else "NaN or inf"
        rows = n_nan + n_inf
        raise InputError(
            f"{where}: {name} has {what} in {rows} row{'s' * (rows != 1)} (first: row {first})"
        )


def check_labels(labels: np.ndarray, n: int, *, where: str) -> np.ndarray:
    """Check labels are [n] non-negative integers; return them as int64."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"{where}: labels must be 1-D [N], got shape {labels.shape}")
    if labels.shape[0] != n:
        raise InputError(f"{where}: labels has {labels.shape[0]} entries but features has {n} rows")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise InputError(f"{where}: labels must be integers, got non-integer values")
    elif labels.dtype.kind not in "iub":
        raise InputError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        first = int(np.flatnonzero(labels < 0)[0])
        raise InputError(f"{where}: labels must be >= 0, got {labels[first]} at row {first}")
    return labels


def check_ids(ids: np.ndarray, n: int, *, where: str) -> np.ndarray:
    """Check sample ids are [n] unique integers; return them as int64."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InputError(f"{where}: ids has shape {ids.shape} but features has {n} rows")
    if ids.dtype.kind not in "iu":
        raise InputError(f"{where}: ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if np.unique(ids).size != n:
        raise InputError(f"{where}: ids are not unique")
    return ids


def check_images(images: np.ndarray, n: int, *, where: str) -> np.ndarray:
    """Check images are [n, H, W] or [n, H, W, C] numbers."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] != n:
        raise InputError(
            f"{where}: images must be [N, H, W] or [N, H, W, C] with N={n}, got {images.shape}"
        )
    if images.dtype.kind not in "fiub":
        raise InputError(f"{where}: images must be numeric, got dtype {images.dtype}")
    return images


def check_dim(dim: int, d_in: int, *, where: str) -> None:
    """Raise when the data's width differs from the config's `d_in`."""
    if dim != d_in:
        raise InputError(f"{where}: dim {dim} does not match the config's d_in {d_in}")
