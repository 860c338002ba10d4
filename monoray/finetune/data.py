"""Finetuning data: labelled images, their frozen CLIP embeddings, augmentation presets.

Image sources (listed by `monoray.extract.sources`, so ids are listing positions):

- `digits`: scikit-learn's 1797 8x8 digits, upsampled to `image_size`; train/val
  is the fixed stratified split of `monoray.data.load_digits` (seed 0, 20 %).
- a CIFAR-10/100 python directory: train = its train split, val = its test split.
- an ImageFolder root with `train/` and `val/` class folders (ImageNet layout).

Embeddings are the frozen CLIP-ViT-B/32 image embeddings of every listed image
(spec §4), made by `monoray extract --encoder clip-vit-b32 --images SRC`: for
digits one store over all 1797 images; for CIFAR and ImageFolder a directory
holding a `train/` and a `val/` store (CIFAR: `--split train` / `--split test`;
ImageFolder: `--images ROOT/train` / `--images ROOT/val`). A store must cover
its listing exactly (same count, ids 0..N-1, and the same listing fingerprint
when the header records one); sample i of a split looks its embedding up by
its id. Embeddings are never updated.

Augmentation presets (PIL ops, then scaling to [0, 1] and the backbone's
mean/std):

- `imagenet`: train RandomResizedCrop(size) + horizontal flip; eval Resize(size·256/224) + CenterCrop.
- `cifar`: train Resize(size) + RandomCrop(size, padding size/8) + horizontal flip; eval Resize + CenterCrop.
- `none`: Resize + CenterCrop for train and eval.

The stored embedding is that of the un-augmented image (the extraction's own
eval preprocessing); an augmented view keeps it. Random crops and flips keep
an image's content, so its CLIP embedding moves little, but MonoLoss then pulls
a latent towards images whose *originals* look alike. `none` makes the
training view and the embedded image the same picture (up to resolution).
Each sample's random draws derive from (seed, epoch, sample id) only, so the
global batch is the same pixels for any number of workers and after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from monoray.data.store import HEADER, open_store
from monoray.errors import InputError
from monoray.extract.sources import (
    CifarSource,
    DigitsSource,
    ImageFolderSource,
    Listing,
    Source,
    open_source,
)

DIGITS = "digits"


@dataclass(frozen=True, slots=True)
class ImageSplit:
    """One split: images by listing reference, labels and embedding rows, in sample order."""

    source: Source
    """Where the images come from."""
    refs: Sequence[str]
    """Per sample, the reference `source.load` takes."""
    ids: np.ndarray
    """[N] int64 listing positions (= sample ids in the embedding store)."""
    labels: np.ndarray
    """[N] int64 class labels."""
    embeddings: Any
    """The embedding store's features ([rows, d], memory-mapped)."""
    rows: np.ndarray
    """[N] row of each sample's embedding in `embeddings`."""

    def __len__(self) -> int:
        return int(self.ids.size)

    def head(self, n: int | None) -> ImageSplit:
        """The first `n` samples (all when None)."""
        if n is None or n >= len(self):
            return self
        return ImageSplit(
            self.source,
            self.refs[:n],
            self.ids[:n],
            self.labels[:n],
            self.embeddings,
            self.rows[:n],
        )


@dataclass(frozen=True, slots=True)
class FinetuneData:
    """Train and val splits with their embeddings."""

    train: ImageSplit
    val: ImageSplit
    n_classes: int
    """Number of classes (the classifier's width)."""
    embedding_dim: int
    """Width of the similarity embeddings."""
    record: dict[str, Any]
    """JSON description (sources, stores, listing fingerprints) stored with checkpoints."""


def open_finetune_data(images: str, embeddings: str, *, subset: int | None = None) -> FinetuneData:
    """Open the image source `images` and its embedding store(s); `InputError` on any mismatch."""
    emb = Path(embeddings).expanduser()
    if not emb.is_dir():
        raise InputError(f"{embeddings}: embeddings store not found (run `monoray extract`)")
    if images == DIGITS:
        return _digits(emb, subset)
    root = Path(images).expanduser()
    if not root.is_dir():
        raise InputError(
            f"{images}: no such directory (expected 'digits', a CIFAR python directory or an "
            "ImageFolder root with train/ and val/)"
        )
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_src: Source = ImageFolderSource(root / "train")
        val_src: Source = ImageFolderSource(root / "val")
    else:
        found = open_source(root)
        if not isinstance(found, CifarSource):
            raise InputError(
                f"{images}: not a CIFAR python directory and has no train/ and val/ "
                "ImageFolder trees"
            )
        train_src, val_src = CifarSource(found.root, "train"), CifarSource(found.root, "test")
    for sub in ("train", "val"):
        if not (emb / sub / HEADER).is_file():
            raise InputError(
                f"{emb}/: expected a {sub}/ embedding store for {images} (extract the train and "
                "the val/test split into <embeddings>/train and <embeddings>/val)"
            )
    train_listing, val_listing = train_src.listing(), val_src.listing()
    if train_listing.labels is None or val_listing.labels is None:
        raise InputError(f"{images}: images must be labelled (class folders)")
    if train_listing.classes and val_listing.classes != train_listing.classes:
        raise InputError(f"{images}: train and val have different classes")
    train_store, train_rows, dim = _store_rows(emb / "train", train_listing, images)
    val_store, val_rows, val_dim = _store_rows(emb / "val", val_listing, images)
    if val_dim != dim:
        raise InputError(f"{emb}/: train and val embeddings differ in width ({dim} vs {val_dim})")
    n_classes = max(len(train_listing.classes), int(train_listing.labels.max()) + 1)
    n_classes = max(n_classes, int(val_listing.labels.max()) + 1)
    train = _split(train_src, train_listing, np.arange(len(train_listing)), train_store, train_rows)
    val = _split(val_src, val_listing, np.arange(len(val_listing)), val_store, val_rows)
    record = {
        "images": str(images),
        "embeddings": str(emb),
        "train": train_src.describe() | {"listing_sha256": train_listing.fingerprint()},
        "val": val_src.describe() | {"listing_sha256": val_listing.fingerprint()},
        "subset": subset,
    }
    return FinetuneData(train.head(subset), val.head(subset), n_classes, dim, record)


def _digits(emb: Path, subset: int | None) -> FinetuneData:
    from monoray.data import load_digits

    source = DigitsSource()
    listing = source.listing()
    store, rows, dim = _store_rows(emb, listing, DIGITS)
    assert listing.labels is not None
    splits = load_digits()
    train = _split(source, listing, splits.train.ids, store, rows)
    val = _split(source, listing, splits.val.ids, store, rows)
    record = {
        "images": DIGITS,
        "embeddings": str(emb),
        "listing_sha256": listing.fingerprint(),
        "subset": subset,
    }
    return FinetuneData(train.head(subset), val.head(subset), 10, dim, record)


def _store_rows(path: Path, listing: Listing, images: str) -> tuple[Any, np.ndarray, int]:
    """(features, row of each listing id, dim) of a store that must cover `listing` exactly."""
    header, split = open_store(path)
    n = len(listing)
    if header.n_samples != n:
        raise InputError(
            f"{path}/: embeddings has {header.n_samples} rows but {images} lists {n} images "
            "(extract embeddings of the same source and split, without --limit)"
        )
    fingerprint = header.extra.get("listing_sha256")
    if fingerprint is not None and fingerprint != listing.fingerprint():
        raise InputError(f"{path}/: embeddings were extracted from other images than {images}")
    ids = split.ids
    if ids.min() < 0 or ids.max() >= n or np.unique(ids).size != n:
        raise InputError(f"{path}/: embedding ids are not the sample ids 0..{n - 1} of {images}")
    rows = np.empty(n, dtype=np.int64)
    rows[ids] = np.arange(n, dtype=np.int64)
    return split.features, rows, header.dim


def _split(
    source: Source, listing: Listing, ids: np.ndarray, store: Any, rows: np.ndarray
) -> ImageSplit:
    assert listing.labels is not None
    ids = np.asarray(ids, dtype=np.int64)
    refs = [listing.refs[i] for i in ids]
    return ImageSplit(source, refs, ids, listing.labels[ids], store, rows[ids])


def build_transform(
    preset: str, size: int, mean: Sequence[float], std: Sequence[float], *, train: bool
) -> Any:
    """The PIL -> normalised float tensor [3, size, size] transform of a preset."""
    from torchvision import transforms as T

    flip = T.RandomHorizontalFlip()
    if preset == "imagenet":
        ops = (
            [T.RandomResizedCrop(size), flip]
            if train
            else [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
        )
    elif preset == "cifar":
        ops = [T.Resize(size), T.CenterCrop(size)]
        if train:
            ops += [T.RandomCrop(size, padding=max(1, size // 8)), flip]
    elif preset == "none":
        ops = [T.Resize(size), T.CenterCrop(size)]
    else:
        raise InputError(f"augment must be imagenet, cifar or none, got {preset!r}")
    return T.Compose([*ops, T.ToTensor(), T.Normalize(list(mean), list(std))])


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """Seed of the random augmentation of one sample in one epoch."""
    return (seed * 1_000_003 + epoch * 7_919 + sample_id * 104_729) % (2**63 - 1)


class ImageDataset(torch.utils.data.Dataset):
    """Item i of a split: (image [3, H, W], label, embedding [d] float32), augmented per epoch."""

    def __init__(self, split: ImageSplit, transform: Any, *, seed: int, epoch: int) -> None:
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor]:
        s = self.split
        image = s.source.load(s.refs[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, int(s.ids[i])))
            x = self.transform(image)
        emb = torch.from_numpy(np.asarray(s.embeddings[int(s.rows[i])], dtype=np.float32))
        return x, int(s.labels[i]), emb
