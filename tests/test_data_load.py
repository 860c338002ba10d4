"""Data layer: digits, .npz interchange files and input validation (real files, no mocks)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from monoray.data import DataSource, load_digits, load_features, load_source
from monoray.errors import InputError


def _npz(path: Path, n: int = 100, d: int = 16, labels: bool = True, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {"features": rng.normal(size=(n, d)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 5, size=n)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_digits_fixed_stratified_split() -> None:
    s = load_features("digits")
    assert s.header.has_labels
    assert s.train.features.dtype == np.float32 and s.train.features.shape == (1438, 54)
    assert len(s.val) == 359
    assert s.val.images is not None and s.val.images.shape == (359, 8, 8)
    # stratified: every class holds ~20% of its samples in val
    counts = np.bincount(s.val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # ids are the original row numbers; the splits partition them
    ids = np.concatenate([s.train.ids, s.val.ids])
    assert np.array_equal(np.sort(ids), np.arange(1797))
    again = load_digits()
    assert np.array_equal(again.val.ids, s.val.ids)
    assert s.source == DataSource("digits", None, 0, 0.2)
    # 54 of the 64 pixels (the rest are blank in > 99% of images); images keep all 64
    kept = s.header.extra["pixels"]
    assert s.header.dim == 54 == len(kept)
    assert np.array_equal(s.val.features[0], s.val.images[0].reshape(-1)[kept])
    # the very pixels scikit-learn's load_digits() returns (read without importing sklearn;
    # digest checked against `load_digits().data` as float32)
    table = np.concatenate([s.train.images, s.val.images]).reshape(-1, 64)
    order = np.argsort(np.concatenate([s.train.ids, s.val.ids]))
    digest = hashlib.sha256(np.ascontiguousarray(table[order], np.float32).tobytes()).hexdigest()
    assert digest == "a627aed550b0b29bf76a981bc1ecbab5ef775aac454c94154f20ec9f61a04c83"
    head = s.head(100)
    assert len(head.train) == 100 and len(head.val) == 100 and head.header == s.header


def test_npz_split_is_seeded_and_round_trips(tmp_path: Path) -> None:
    path = _npz(tmp_path / "f.npz", n=100)
    a = load_features(path)
    b = load_features(str(path))
    c = load_features(path, seed=1)
    assert len(a.train) == 80 and len(a.val) == 20
    assert np.array_equal(a.val.ids, b.val.ids) and not np.array_equal(a.val.ids, c.val.ids)
    assert np.array_equal(np.sort(np.concatenate([a.train.ids, a.val.ids])), np.arange(100))
    raw = np.load(path)
    assert np.array_equal(a.val.features, raw["features"][a.val.ids])
    assert np.array_equal(a.val.labels, raw["labels"][a.val.ids])
    again = load_source(a.source)
    assert np.array_equal(again.train.features, a.train.features)


def test_npz_with_separate_val_file(tmp_path: Path) -> None:
    tr = _npz(tmp_path / "tr.npz", n=50)
    va = _npz(tmp_path / "va.npz", n=10, labels=False)
    s = load_features(tr, val_source=va)
    assert len(s.train) == 50 and len(s.val) == 10
    assert s.val.labels is None and not s.header.has_labels
    assert s.source.val_features == str(va.resolve())


def _err(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_npz_inputs_give_one_line_errors(tmp_path: Path) -> None:
    x = np.ones((100, 8), np.float32)
    x[[17, 40, 41], 2] = np.nan
    np.savez(tmp_path / "nan.npz", features=x)
    assert _err(load_features, tmp_path / "nan.npz").endswith(
        "nan.npz: 'features' has NaN in 3 rows (first: row 17)"
    )
    x = np.ones((100, 8), np.float32)
    x[5, 0] = np.inf
    np.savez(tmp_path / "inf.npz", features=x)
    assert "'features' has inf in 1 row (first: row 5)" in _err(load_features, tmp_path / "inf.npz")

    np.savez(tmp_path / "lab.npz", features=np.ones((100, 8)), labels=np.zeros(99, int))
    assert _err(load_features, tmp_path / "lab.npz").endswith(
        "lab.npz: labels has 99 entries but features has 100 rows"
    )
    np.savez(tmp_path / "rank.npz", features=np.ones(100))
    assert "must be 2-D [N, d], got shape (100,)" in _err(load_features, tmp_path / "rank.npz")
    np.savez(tmp_path / "nofeat.npz", x=np.ones((3, 3)))
    assert "no array named 'features' (found: x)" in _err(load_features, tmp_path / "nofeat.npz")
    np.savez(tmp_path / "tiny.npz", features=np.ones((2, 3)))
    assert "val split is empty (2 rows" in _err(load_features, tmp_path / "tiny.npz")
    np.savez(tmp_path / "obj.npz", features=np.array([{"a": 1}], dtype=object))
    assert "never unpickles" in _err(load_features, tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in _err(load_features, tmp_path / "junk.npz")
    assert "no such file or directory" in _err(load_features, tmp_path / "missing.npz")
    good = _npz(tmp_path / "good.npz", n=20, d=16)
    assert re.search(
        r"good\.npz: dim 16 does not match the config's d_in 768$",
        _err(load_features, good, d_in=768),
    )
    other = _npz(tmp_path / "other.npz", n=20, d=8)
    assert "dim 8 does not match" in _err(load_features, good, val_source=other)
    assert "takes no --val-features" in _err(load_features, "digits", val_source=good)
    np.savez(tmp_path / "neg.npz", features=np.ones((10, 2)), labels=-np.ones(10, int))
    assert "labels must be >= 0" in _err(load_features, tmp_path / "neg.npz")
