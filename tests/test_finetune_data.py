"""Finetune data: CIFAR python dirs, ImageFolder trees and digits with embeddings from the
extraction pipeline, looked up by sample id; count mismatches; augmentation determinism."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monoray.data.store import open_store
from monoray.errors import InputError
from monoray.extract.encoders import EncoderSpec
from monoray.extract.pipeline import ExtractConfig, extract
from monoray.finetune.data import ImageDataset, build_transform, open_finetune_data

ENCODER = EncoderSpec("vit-ti16", "random-init", image_size=16, device="cpu")
"""A small random-init encoder: these tests check plumbing, not embedding quality."""


def _extract(images: str | Path, out: Path, **kwargs) -> Path:
    cfg = ExtractConfig(
        encoder=ENCODER, images=str(images), out=out, loader_workers=0, progress=False, **kwargs
    )
    extract(cfg)
    return out


def _pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CIFAR-10 python directory (5 x 4 train, 6 test images) and its embeddings."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        _pickle(root / f"data_batch_{i}", {b"data": data, b"labels": [i, i + 1, 0, 3]})
    test = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    _pickle(root / "test_batch", {b"data": test, b"labels": [0, 1, 2, 3, 4, 9]})
    names = [f"c{i}".encode() for i in range(10)]
    _pickle(root / "batches.meta", {b"label_names": names})
    emb = root.parent / "emb"
    _extract(root, emb / "train", split="train")
    _extract(root, emb / "val", split="test")
    return root, emb


def test_cifar_splits_look_up_embeddings_by_sample_id(cifar):
    root, emb = cifar
    data = open_finetune_data(str(root), str(emb))
    assert (len(data.train), len(data.val), data.n_classes) == (20, 6, 10)
    assert data.embedding_dim == 192
    assert data.train.labels[:4].tolist() == [1, 2, 0, 3]
    _, store = open_store(emb / "val")
    tf = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
    ds = ImageDataset(data.val, tf, seed=0, epoch=0)
    for i in (0, 5):
        x, label, e = ds[i]
        row = int(np.flatnonzero(store.ids == data.val.ids[i])[0])
        assert torch.equal(e, torch.from_numpy(np.asarray(store.features[row], np.float32)))
        assert label == data.val.labels[i] and x.shape == (3, 32, 32)
    assert len(open_finetune_data(str(root), str(emb), subset=3).train) == 3


def test_embeddings_must_cover_the_images(cifar, tmp_path):
    root, emb = cifar
    short = tmp_path / "short"
    _extract(root, short / "train", split="train", limit=7)
    (short / "val").symlink_to(emb / "val")
    with pytest.raises(InputError, match=r"has 7 rows but .* lists 20 images") as err:
        open_finetune_data(str(root), str(short))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="expected a train/ embedding store"):
        open_finetune_data(str(root), str(tmp_path))
    other = tmp_path / "cifar-10-batches-py"  # same files but other test labels
    shutil.copytree(root, other)
    test = pickle.loads((root / "test_batch").read_bytes(), encoding="bytes")
    _pickle(other / "test_batch", {b"data": test[b"data"], b"labels": [9, 9, 9, 9, 9, 9]})
    with pytest.raises(InputError, match="extracted from other images"):
        open_finetune_data(str(other), str(emb))


def test_digits_embeddings_count_is_checked(tmp_path):
    store = _extract("digits", tmp_path / "digits", limit=10)
    with pytest.raises(InputError, match="has 10 rows but digits lists 1797 images"):
        open_finetune_data("digits", str(store))


def test_imagefolder_train_val_layout(tmp_path):
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    emb = tmp_path / "emb"
    _extract(root / "train", emb / "train")
    _extract(root / "val", emb / "val")
    data = open_finetune_data(str(root), str(emb))
    assert (len(data.train), len(data.val), data.n_classes) == (6, 4, 2)
    assert data.val.labels.tolist() == [0, 0, 1, 1]


def test_augmentation_depends_only_on_seed_epoch_and_sample(cifar):
    root, emb = cifar
    data = open_finetune_data(str(root), str(emb))
    tf = build_transform("cifar", 32, (0.5,) * 3, (0.5,) * 3, train=True)
    a = ImageDataset(data.train, tf, seed=1, epoch=3)
    b = ImageDataset(data.train, tf, seed=1, epoch=3)
    torch.manual_seed(123)  # the global RNG plays no part
    views = [a[i][0] for i in range(6)]
    assert all(torch.equal(views[i], b[i][0]) for i in range(6))
    other = ImageDataset(data.train, tf, seed=1, epoch=4)
    assert any(not torch.equal(views[i], other[i][0]) for i in range(6))
    plain = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=True)
    fixed = ImageDataset(data.train, plain, seed=1, epoch=3)
    eval_tf = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
    assert torch.equal(fixed[2][0], ImageDataset(data.train, eval_tf, seed=9, epoch=0)[2][0])


def test_shipped_finetune_spaces_load():
    from monoray.sweep.space import load_space

    paths = sorted((Path(__file__).parents[1] / "search_spaces").glob("finetune_*.yaml"))
    assert len(paths) == 5
    for path in paths:
        space = load_space(path)
        assert space.kind == "finetune" and space.data.embeddings
        assert space.metric_names == ["accuracy", "monoscore_mean"]


def test_finetune_space_errors_name_the_key(tmp_path):
    from monoray.sweep.space import load_space
    from monoray.trials.finetune import check_finetune_space

    path = tmp_path / "space.yaml"
    path.write_text("kind: finetune\ndata: {features: digits}\nfixed: {random_init: true}\n")
    with pytest.raises(InputError, match=r"data.embeddings: expected the path"):
        load_space(path)
    emb = [f"data.embeddings={tmp_path}"]
    with pytest.raises(InputError, match=r"fixed.images: unknown finetune trial parameter"):
        load_space(path, [*emb, "fixed.images=/data"])  # images come from data.features
    with pytest.raises(InputError, match=r"fixed.weights: rel.pth is relative"):
        check_finetune_space(
            load_space(path, [*emb, "fixed.random_init=null", "fixed.weights=rel.pth"])
        )
    with pytest.raises(InputError, match="not a feature store"):
        check_finetune_space(load_space(path, emb))
    path.write_text("kind: sae\ndata: {features: digits, embeddings: e}\n")
    with pytest.raises(InputError, match=r"data.embeddings: expected no embeddings"):
        load_space(path)


def test_cifar100_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(3)
    for name, labels in (("train", [5, 99, 42]), ("test", [7, 0])):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        coarse = [0] * len(labels)
        _pickle(root / name, {b"data": data, b"fine_labels": labels, b"coarse_labels": coarse})
    _pickle(root / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    emb = tmp_path / "emb"
    _extract(root, emb / "train", split="train")
    _extract(root, emb / "val", split="test")
    data = open_finetune_data(str(root), str(emb))
    assert data.n_classes == 100
    assert data.train.labels.tolist() == [5, 99, 42] and data.val.labels.tolist() == [7, 0]
    assert data.record["train"]["kind"] == "cifar100"
