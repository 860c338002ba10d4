"""Feature stores: writer, resumable extraction, memory-mapped sharded reads, checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monoray.data import FeatureStoreWriter, ShardedArray, load_features, open_store
from monoray.errors import InputError


def _data(n: int = 1000, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, np.arange(10_000, 10_000 + n), rng.integers(0, 7, n)


def _write(path: Path, x, ids, labels, *, dtype="float32", shard_rows=300, batch=128) -> None:  # type: ignore[no-untyped-def]
    with FeatureStoreWriter(
        path,
        encoder="toy",
        dim=x.shape[1],
        dtype=dtype,
        has_labels=labels is not None,
        shard_rows=shard_rows,
        normalisation="unit",
    ) as w:
        for i in range(0, len(x), batch):
            w.append(
                x[i : i + batch],
                ids[i : i + batch],
                None if labels is None else labels[i : i + batch],
            )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_round_trip(tmp_path: Path, dtype: str) -> None:
    x, ids, labels = _data()
    _write(tmp_path / "s", x, ids, labels, dtype=dtype)
    header = json.loads((tmp_path / "s" / "header.json").read_text())
    assert header["dim"] == 12 and header["dtype"] == dtype and header["n_samples"] == 1000
    assert [s["rows"] for s in header["shards"]] == [300, 300, 300, 100]
    assert header["encoder"] == "toy" and header["normalisation"] == "unit"
    assert header["created_by"].startswith("monoray ") and header["has_labels"]
    _, split = open_store(tmp_path / "s", verify_checksums=True)
    assert isinstance(split.features, ShardedArray)
    tol = 1e-3 if dtype == "float16" else 0
    np.testing.assert_allclose(np.asarray(split.features), x, rtol=tol, atol=tol)
    assert np.array_equal(split.ids, ids) and np.array_equal(split.labels, labels)
    # 80/20 split by seed keeps rows, ids and labels aligned
    s = load_features(tmp_path / "s", seed=3)
    assert len(s.train) == 800 and len(s.val) == 200
    rows = s.val.ids - 10_000
    np.testing.assert_allclose(s.val.features[np.arange(200)], x[rows], rtol=tol, atol=tol)
    assert np.array_equal(s.val.labels, labels[rows])
    # pickling ships paths and the row index, not the data
    assert len(pickle.dumps(s.train.features)) < 20_000
    assert np.array_equal(pickle.loads(pickle.dumps(s.val.features))[5], s.val.features[5])


def test_single_float32_shard_is_a_memmap(tmp_path: Path) -> None:
    x, ids, _ = _data(200)
    _write(tmp_path / "s", x, ids, None, shard_rows=1000)
    _, split = open_store(tmp_path / "s")
    assert isinstance(split.features, np.memmap) and split.labels is None


def test_train_val_subdirectories(tmp_path: Path) -> None:
    x, ids, labels = _data(500)
    _write(tmp_path / "s" / "train", x[:400], ids[:400], labels[:400])
    _write(tmp_path / "s" / "val", x[400:], ids[400:], labels[400:])
    s = load_features(tmp_path / "s")
    assert len(s.train) == 400 and len(s.val) == 100
    assert np.array_equal(s.val.ids, ids[400:])


def test_writer_resumes_after_a_crash(tmp_path: Path) -> None:
    x, ids, labels = _data(1000)
    _write(tmp_path / "ref", x, ids, labels)
    # First run dies after 2 flushed shards with rows still buffered and a half-written temp file.
    w = FeatureStoreWriter(
        tmp_path / "s",
        encoder="toy",
        dim=12,
        dtype="float32",
        has_labels=True,
        shard_rows=300,
        normalisation="unit",
    )
    w.append(x[:700], ids[:700], labels[:700])
    assert w.n_samples == 600
    del w
    (tmp_path / "s" / ".shard-00002.npy.tmp999").write_bytes(b"partial")
    (tmp_path / "s" / "shard-00002.npy").write_bytes(b"renamed but not in header")
    with pytest.raises(InputError, match="incomplete"):
        load_features(tmp_path / "s")
    with pytest.raises(InputError, match="existing store has dim=12"):
        FeatureStoreWriter(tmp_path / "s", encoder="toy", dim=13, dtype="float32", has_labels=True)
    w = FeatureStoreWriter(
        tmp_path / "s",
        encoder="toy",
        dim=12,
        dtype="float32",
        has_labels=True,
        shard_rows=300,
        normalisation="unit",
    )
    start = w.n_samples
    assert start == 600 and not (tmp_path / "s" / ".shard-00002.npy.tmp999").exists()
    for i in range(start, 1000, 128):
        w.append(x[i : i + 128], ids[i : i + 128], labels[i : i + 128])
    w.close()
    _, a = open_store(tmp_path / "s", verify_checksums=True)
    _, b = open_store(tmp_path / "ref")
    assert np.array_equal(np.asarray(a.features), np.asarray(b.features))
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)


def test_store_problems_are_one_line_errors(tmp_path: Path) -> None:
    x, ids, labels = _data(400)
    _write(tmp_path / "s", x, ids, labels)
    w = FeatureStoreWriter(tmp_path / "w", encoder="toy", dim=12, dtype="float16")
    with pytest.raises(InputError, match=r"batch \(as float16\) has inf in 1 row \(first: row 2\)"):
        bad = x[:4].copy()
        bad[2, 1] = 1e6  # overflows float16
        w.append(bad, ids[:4])
    with pytest.raises(InputError, match="dim 12 does not match the config's d_in 768"):
        load_features(tmp_path / "s", d_in=768)
    # a damaged shard: caught by the checksum, and its NaN by the scan
    shard = tmp_path / "s" / "shard-00001.npy"
    arr = np.load(shard)
    arr[7, 0] = np.nan
    np.save(shard, arr)
    with pytest.raises(InputError, match="does not match its sha256"):
        open_store(tmp_path / "s", verify_checksums=True)
    with pytest.raises(InputError, match=r"'features' has NaN in 1 row \(first: row 307\)"):
        open_store(tmp_path / "s")
    (tmp_path / "s" / "labels-00000.npy").unlink()
    with pytest.raises(InputError, match=r"missing shard file labels-00000\.npy"):
        load_features(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a feature store"):
        load_features(tmp_path / "empty")


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    data=st.data(),
)
def test_sharded_array_indexes_like_numpy(
    tmp_path_factory: pytest.TempPathFactory, sizes, data
) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("sh")
    full = np.arange(sum(sizes) * 3, dtype=np.float32).reshape(-1, 3)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        np.save(d / f"{i}.npy", full[start : start + n])
        paths.append(d / f"{i}.npy")
        start += n
    arr = ShardedArray(paths)
    n = len(full)
    rows = np.array(data.draw(st.lists(st.integers(0, n - 1), unique=True)), dtype=np.int64)
    view, ref = arr.subset(np.sort(rows)), full[np.sort(rows)]
    assert view.shape == ref.shape
    if len(ref):
        idx = np.array(
            data.draw(st.lists(st.integers(-len(ref), len(ref) - 1), max_size=8)), dtype=np.int64
        )
        assert np.array_equal(view[idx].reshape(-1, 3), ref[idx].reshape(-1, 3))
        a, b = sorted(data.draw(st.tuples(st.integers(0, len(ref)), st.integers(0, len(ref)))))
        assert np.array_equal(view[a:b], ref[a:b])
    a, b = sorted(data.draw(st.tuples(st.integers(0, n), st.integers(0, n))))
    assert np.array_equal(arr[a:b], full[a:b])
    assert np.array_equal(arr[::2], full[::2])
