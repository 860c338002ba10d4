"""`load_features`: one entry point for the built-in digits set, `.npz` files and stores."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from monoray.data.store import HEADER, open_store
from monoray.data.types import DataSource, FeatureSplit, FeatureSplits, StoreHeader, take_rows
from monoray.data.validate import check_dim, check_features, check_ids, check_images, check_labels
from monoray.data.zero_rows import apply_zero_rows, check_policy
from monoray.errors import InputError

DIGITS = "digits"
"""Name of the built-in dataset: scikit-learn's bundled 8x8 digits (1797 images, 10 classes)."""

DIGITS_MIN_INK = 0.01
"""A digits pixel is a feature when it has ink in at least this share of the 1797 images.

10 of the 64 pixels (the left and right borders) are blank in over 99% of images;
8 of them are never inked in the val split and the other 2 in 1-2 val images.
The paper's R² averages `1 - SS_res/SS_tot` over dims, so a dim whose variance
comes from one sample dominates it (one such pixel alone scored R² = -220 for
an SAE with explained variance 0.78). The 54 kept pixels make R² meaningful.
"""


def load_features(
    source: str | Path,
    *,
    val_source: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    d_in: int | None = None,
    zero_rows: str = "keep",
) -> FeatureSplits:
    """Load train/val feature splits from "digits", a `.npz` file or a feature-store directory.

    Without `val_source`, a single source is split `1 - val_fraction` /
    `val_fraction` by `seed` (digits: stratified by class; a store directory
    with `train/` and `val/` subdirectories: those). With `val_source`, all of
    `source` is the train split and all of `val_source` the val split.
    `d_in`, if given, must equal the feature width. All-zero rows are
    counted (`FeatureSplits.zero_rows`) and kept, dropped or refused by
    `zero_rows` (see `monoray.data.zero_rows`). Every problem raises one
    `InputError` naming the file.
    """
    check_policy(zero_rows)
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    name = str(source)
    if name == DIGITS:
        if val_source is not None:
            raise InputError("digits has its own train/val split; it takes no --val-features")
        splits = load_digits(seed=seed, val_fraction=val_fraction)
    elif val_source is not None:
        header, train = _load_one(name)
        vname = str(val_source)
        val_header, val = _load_one(vname)
        if val_header.dim != header.dim:
            raise InputError(
                f"{vname}: dim {val_header.dim} does not match {name}'s dim {header.dim}"
            )
        header = _replace(header, n_samples=len(train) + len(val))
        header = _replace(header, has_labels=train.labels is not None and val.labels is not None)
        splits = FeatureSplits(train=train, val=val, header=header)
    else:
        path = Path(name)
        if path.is_dir() and not (path / HEADER).exists() and (path / "train").is_dir():
            header, train = _load_one(str(path / "train"))
            val_header, val = _load_one(str(path / "val"))
            if val_header.dim != header.dim or val_header.encoder != header.encoder:
                raise InputError(f"{name}: train/ and val/ stores disagree on encoder or dim")
            header = _replace(header, n_samples=len(train) + len(val))
            splits = FeatureSplits(train=train, val=val, header=header)
        else:
            header, whole = _load_one(name)
            train, val = split_random(whole, seed=seed, val_fraction=val_fraction, where=name)
            splits = FeatureSplits(train=train, val=val, header=header)
    if d_in is not None:
        check_dim(splits.header.dim, d_in, where=name)
    src = DataSource(
        features=name if name == DIGITS else str(Path(name).resolve()),
        val_features=None if val_source is None else str(Path(val_source).resolve()),
        seed=seed,
        val_fraction=val_fraction,
        zero_rows=zero_rows,
    )
    train, val, zero = apply_zero_rows(splits.train, splits.val, zero_rows, where=name)
    return FeatureSplits(train=train, val=val, header=splits.header, source=src, zero_rows=zero)


def load_source(source: DataSource) -> FeatureSplits:
    """Load the splits a `DataSource` (e.g. recorded in a checkpoint) describes."""
    return load_features(
        source.features,
        val_source=source.val_features,
        seed=source.seed,
        val_fraction=source.val_fraction,
        zero_rows=source.zero_rows,
    )


def load_digits(*, seed: int = 0, val_fraction: float = 0.2) -> FeatureSplits:
    """scikit-learn's bundled digits: pixel values (0..16) as float32, labels, 8x8 images.

    Features are the 54 pixels inked in at least `DIGITS_MIN_INK` of the
    images (their indices in `header.extra["pixels"]`); `images` keep all 64.
    The split is stratified by class and fixed by `seed` (default 0): 1438
    train and 359 val samples. Ids are the row numbers in `load_digits()`.
    """
    table = _digits_table()
    pixels = np.ascontiguousarray(table[:, :-1], dtype=np.float32)
    y = table[:, -1].astype(np.int64)
    images = pixels.reshape(-1, 8, 8)
    kept = np.flatnonzero((pixels > 0).mean(axis=0) >= DIGITS_MIN_INK)
    x = np.ascontiguousarray(pixels[:, kept])
    rng = np.random.default_rng(seed)
    val_rows = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        n_val = round(rows.size * val_fraction)
        val_rows.append(rng.permutation(rows)[:n_val])
    val_idx = np.sort(np.concatenate(val_rows))
    train_idx = np.setdiff1d(np.arange(y.size), val_idx)
    ids = np.arange(y.size, dtype=np.int64)

    def take(rows: np.ndarray) -> FeatureSplit:
        return FeatureSplit(features=x[rows], labels=y[rows], ids=ids[rows], images=images[rows])

    header = StoreHeader(
        encoder="digits-pixels",
        dim=x.shape[1],
        dtype="float32",
        normalisation="none",
        n_samples=y.size,
        has_labels=True,
        created_by="scikit-learn load_digits",
        extra={
            "image_shape": [8, 8],
            "num_classes": 10,
            "pixel_range": [0, 16],
            "pixels": kept.tolist(),
            "min_ink": DIGITS_MIN_INK,
        },
    )
    return FeatureSplits(train=take(train_idx), val=take(val_idx), header=header)


def _digits_table() -> np.ndarray:
    """[1797, 65] pixels + label: the CSV scikit-learn bundles, read directly.

    `sklearn.datasets.load_digits()` reads this very file; importing scikit-learn
    only to parse it costs seconds per process, so we read it ourselves and
    fall back to scikit-learn if its layout ever changes.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            if table.shape == (1797, 65):
                return table
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return np.column_stack([bunch.data, bunch.target])


def split_random(
    split: FeatureSplit, *, seed: int, val_fraction: float, where: str
) -> tuple[FeatureSplit, FeatureSplit]:
    """Split rows at random by `seed` into (train, val); each keeps source order."""
    n = len(split)
    n_val = round(n * val_fraction)
    if n_val == 0 or n_val == n:
        which = "val" if n_val == 0 else "train"
        raise InputError(f"{where}: {which} split is empty ({n} rows, val_fraction {val_fraction})")
    perm = np.random.default_rng(seed).permutation(n)
    return take_rows(split, np.sort(perm[n_val:])), take_rows(split, np.sort(perm[:n_val]))


def _replace(header: StoreHeader, **changes: Any) -> StoreHeader:
    import dataclasses

    return dataclasses.replace(header, **changes)


def _load_one(name: str) -> tuple[StoreHeader, FeatureSplit]:
    path = Path(name)
    if not path.exists():
        raise InputError(
            f"{name}: no such file or directory (expected 'digits', a .npz file "
            "or a feature-store directory)"
        )
    if path.is_dir():
        return open_store(path)
    return load_npz(path)


def load_npz(path: str | Path) -> tuple[StoreHeader, FeatureSplit]:
    """Read `features` [N, d] and optional `labels` [N], `ids` [N], `images` [N, H, W(, C)],
    `encoder` (a string) from an `.npz` file; never unpickles."""
    path = Path(path)
    where = str(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise InputError(f"{where}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "features" not in keys:
                found = ", ".join(sorted(keys)) or "none"
                raise InputError(f"{where}: no array named 'features' (found: {found})")
            arrays = {
                k: npz[k] for k in ("features", "labels", "ids", "images", "encoder") if k in keys
            }
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise InputError(f"{where}: not a readable .npz file ({err})") from None
    except ValueError:  # object arrays need pickle, which we refuse
        raise InputError(f"{where}: holds object arrays, which monoray never unpickles") from None
    features = check_features(arrays["features"], where=where)
    n = features.shape[0]
    labels = check_labels(arrays["labels"], n, where=where) if "labels" in arrays else None
    ids = (
        check_ids(arrays["ids"], n, where=where)
        if "ids" in arrays
        else np.arange(n, dtype=np.int64)
    )
    images = check_images(arrays["images"], n, where=where) if "images" in arrays else None
    encoder = str(arrays["encoder"]) if "encoder" in arrays else "unknown"
    header = StoreHeader(
        encoder=encoder,
        dim=int(features.shape[1]),
        dtype="float32",
        normalisation="none",
        n_samples=n,
        has_labels=labels is not None,
        created_by="npz",
    )
    return header, FeatureSplit(features=features, labels=labels, ids=ids, images=images)
