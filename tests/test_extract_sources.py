"""Image sources of `monoray extract`: listings, ids, labels, CIFAR's pickles, bad inputs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from monoray.errors import InputError
from monoray.extract.sources import (
    CifarSource,
    DigitsSource,
    ImageFolderSource,
    TableSource,
    load_cifar_file,
    open_source,
)


def _png(path, color, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_listing_is_sorted_with_class_labels(tmp_path):
    for cls, names in {"zebra": ["b.png", "a.jpg"], "ant": ["x.png", "sub/y.png"]}.items():
        for n in names:
            _png(tmp_path / cls / n, (10, 20, 30))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    src = open_source(tmp_path)
    assert isinstance(src, ImageFolderSource)
    listing = src.listing()
    assert list(listing.refs) == ["ant/sub/y.png", "ant/x.png", "zebra/a.jpg", "zebra/b.png"]
    assert listing.labels.tolist() == [0, 0, 2, 2]
    assert listing.classes == ("ant", "empty", "zebra")
    assert src.load("zebra/a.jpg").size == (20, 14)
    assert listing.fingerprint() == src.listing().fingerprint()


def test_flat_folder_is_unlabelled(tmp_path):
    for n in ("2.png", "1.png"):
        _png(tmp_path / n, (0, 0, 0))
    listing = open_source(tmp_path).listing()
    assert list(listing.refs) == ["1.png", "2.png"] and listing.labels is None


def test_empty_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no images found"):
        open_source(tmp_path).listing()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_listing_string_labels_and_relative_paths(tmp_path, fmt):
    import pyarrow as pa

    _png(tmp_path / "imgs" / "a.png", (1, 2, 3))
    _png(tmp_path / "imgs" / "b.png", (4, 5, 6))
    table = pa.table(
        {"path": ["imgs/b.png", str(tmp_path / "imgs" / "a.png")], "label": ["/m/dog", "/m/cat"]}
    )
    path = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    src = open_source(path)
    assert isinstance(src, TableSource)
    listing = src.listing()
    assert listing.classes == ("/m/cat", "/m/dog")
    assert listing.labels.tolist() == [1, 0]  # ids keep the file's row order
    assert src.load(listing.refs[0]).getpixel((0, 0)) == (4, 5, 6)
    assert src.location(listing.refs[0]) == str(tmp_path / "imgs" / "b.png")


def test_table_without_path_column_names_the_columns(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("filename,label\na.png,1\n")
    with pytest.raises(InputError, match=r"list.csv: no image path column .*found filename, label"):
        open_source(path).listing()


def test_table_integer_labels(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("image,label\na.png,3\nb.png,0\n")
    listing = open_source(path).listing()
    assert listing.labels.tolist() == [3, 0] and listing.classes == ()


def _write_cifar10(root, n_per_batch=3):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [(i + j) % 10 for j in range(n_per_batch)],
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{j}.png".encode() for j in range(n_per_batch)],
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, f, protocol=2)


def test_cifar10_python_directory(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar10(root)
    train = open_source(root)
    assert isinstance(train, CifarSource) and train.variant == "cifar10"
    listing = train.listing()
    assert len(listing) == 15 and listing.refs[3] == "data_batch_2#0"
    assert listing.labels[:4].tolist() == [0, 1, 2, 1]
    assert listing.classes[:2] == ("c0", "c1")
    raw = load_cifar_file(root / "data_batch_2")["data"][0]
    img = np.asarray(train.load("data_batch_2#0"))
    assert img.shape == (32, 32, 3)
    np.testing.assert_array_equal(img, raw.reshape(3, 32, 32).transpose(1, 2, 0))
    test = open_source(root, split="test").listing()
    assert len(test) == 3 and test.refs[0] == "test_batch#0"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_code(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar10(root)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(InputError, match=r"data_batch_1: not a CIFAR python file .*refusing"):
        open_source(root).listing()


def test_digits_source_matches_load_digits():
    from sklearn.datasets import load_digits

    src = DigitsSource()
    listing = src.listing()
    assert len(listing) == 1797 and listing.labels[:3].tolist() == [0, 1, 2]
    img = src.load("5")
    assert img.mode == "RGB" and img.size == (8, 8)
    grey = np.asarray(img)[..., 0].astype(np.float64)
    np.testing.assert_allclose(grey / 255 * 16, load_digits().images[5], atol=0.04)


def test_open_source_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        open_source(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputError, match=r"must end in \.csv or \.parquet"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(InputError, match="only applies to CIFAR"):
        open_source(tmp_path, split="test")
    with pytest.raises(InputError, match="digits takes no"):
        open_source("digits", split="train")
