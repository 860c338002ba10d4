"""The data contract: feature splits as numpy arrays, plus the store header.

Arrays stay numpy (or a lazily concatenated, memory-mapped `ShardedArray` for
large stores) so that `ray.put` shares them across Tune trials without copies;
the trainer gathers batches into torch tensors itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from monoray.data.sharded import CHUNK_ROWS, ShardedArray

if TYPE_CHECKING:
    FeatureArray: TypeAlias = np.ndarray | ShardedArray
else:
    FeatureArray: TypeAlias = Any

STORE_SCHEMA_VERSION = 1
"""Version of the on-disk `header.json` layout written by `FeatureStoreWriter`."""

DTYPES = ("float16", "float32")
"""Storage dtypes a feature store may use."""


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One finished shard of a feature store, as recorded in `header.json`."""

    index: int
    """Shard number; its files are `shard-{index:05d}.npy`, `ids-...`, `labels-...`."""
    rows: int
    """Number of samples in the shard."""
    sha256: str
    """Hex SHA-256 of the shard's feature file (`shard-*.npy`)."""

    @property
    def features_file(self) -> str:
        """File name of the features array [rows, dim]."""
        return f"shard-{self.index:05d}.npy"

    @property
    def ids_file(self) -> str:
        """File name of the sample ids [rows] int64."""
        return f"ids-{self.index:05d}.npy"

    @property
    def labels_file(self) -> str:
        """File name of the labels [rows] int64 (present when the store has labels)."""
        return f"labels-{self.index:05d}.npy"


@dataclass(frozen=True, slots=True)
class StoreHeader:
    """What a feature set is: the encoder that made it, its width and storage.

    For a feature store this is its `header.json`; for `.npz` files and the
    built-in `digits` set the loader fills it in (`shards` empty).
    """

    encoder: str
    """Name of the model (and layer) that produced the features, e.g. "clip-vit-b32"."""
    dim: int
    """Feature width d."""
    dtype: str = "float32"
    """Storage dtype, "float16" or "float32" (features are always served as float32)."""
    normalisation: str = "none"
    """Normalisation already applied to the stored features ("none", "unit", ...)."""
    n_samples: int = 0
    """Total number of samples (sum of shard rows)."""
    has_labels: bool = False
    """Whether every sample has an integer class label."""
    shards: tuple[ShardInfo, ...] = ()
    """Finished shards in order; empty for `.npz` and `digits`."""
    created_by: str = ""
    """`monoray <version>` that wrote the store."""
    schema_version: int = STORE_SCHEMA_VERSION
    """Layout version of `header.json`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata from the producer (dataset name, image size, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the `header.json` content)."""
        d = dataclasses.asdict(self)
        d["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreHeader:
        """Inverse of `to_dict`; raises `KeyError`/`TypeError` on malformed input."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"unknown header key {unknown[0]!r}")
        kwargs = dict(d)
        kwargs["shards"] = tuple(ShardInfo(**s) for s in d.get("shards", ()))
        kwargs["dim"] = int(d["dim"])
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class FeatureSplit:
    """One split (train or val) of a feature set."""

    features: FeatureArray
    """[N, d] float32 array, a read-only np.memmap, or a `ShardedArray` over store shards."""
    labels: np.ndarray | None
    """[N] int64 class labels, or None when the set has none."""
    ids: np.ndarray
    """[N] int64 sample ids, stable across runs (row number in the source for .npz/digits)."""
    images: np.ndarray | None = None
    """[N, H, W] or [N, H, W, C] images for `monoray inspect` (digits has them), else None."""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature width d."""
        return int(self.features.shape[1])


ZERO_ROWS = ("keep", "drop", "error")
"""What loading does with all-zero feature rows (`monoray.data.zero_rows`); "keep" is the default."""


@dataclass(frozen=True, slots=True)
class ZeroRows:
    """All-zero rows found when the splits were loaded, and what was done with them."""

    policy: str = "keep"
    """One of `ZERO_ROWS`."""
    train: int = 0
    """All-zero rows in the train split as loaded (before any drop)."""
    val: int = 0
    """All-zero rows in the val split as loaded (before any drop)."""

    def metrics(self) -> dict[str, float]:
        """`zero_rows_train` / `zero_rows_val` (for metrics.json and the trackers)."""
        return {"zero_rows_train": float(self.train), "zero_rows_val": float(self.val)}

    def describe(self) -> str:
        """One line for the load report."""
        if not self.train and not self.val:
            return "no all-zero rows"
        what = {"keep": "kept: similarity 0 with every sample", "drop": "dropped"}[self.policy]
        return f"all-zero rows: {self.train} train, {self.val} val ({what})"


@dataclass(frozen=True, slots=True)
class DataSource:
    """Where a `FeatureSplits` came from: enough to load the same splits again."""

    features: str
    """"digits", an absolute `.npz` path or an absolute feature-store directory."""
    val_features: str | None = None
    """Separate validation source, or None to split `features` by `seed`."""
    seed: int = 0
    """Seed of the train/val split (ignored when `val_features` is given)."""
    val_fraction: float = 0.2
    """Share of samples in the validation split when splitting."""
    zero_rows: str = "keep"
    """What was done with all-zero feature rows (one of `ZERO_ROWS`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSource:
        """Inverse of `to_dict`."""
        return cls(**d)


@dataclass(frozen=True, slots=True)
class FeatureSplits:
    """Train and validation splits of one feature set, with its header."""

    train: FeatureSplit
    """Split the SAE is trained on."""
    val: FeatureSplit
    """Split every epoch's metrics are computed on."""
    header: StoreHeader
    """Encoder, dim, dtype and normalisation of the features."""
    source: DataSource | None = None
    """How to load these splits again (recorded in checkpoints for `monoray inspect`)."""
    zero_rows: ZeroRows | None = None
    """All-zero rows found at load and what was done with them (None: not counted)."""

    def head(self, n: int) -> FeatureSplits:
        """At most the first `n` rows of each split (dry runs, smoke tests)."""

        def cut(split: FeatureSplit) -> FeatureSplit:
            return split if len(split) <= n else take_rows(split, np.arange(n))

        train, val, zero = cut(self.train), cut(self.val), self.zero_rows
        if zero is not None and zero.policy == "keep":
            zero = count_zero_rows(train, val)
        return FeatureSplits(
            train=train, val=val, header=self.header, source=self.source, zero_rows=zero
        )


def take_rows(split: FeatureSplit, rows: np.ndarray) -> FeatureSplit:
    """A split of some rows; memory-mapped features stay lazy (a `ShardedArray` view)."""
    x = split.features
    if isinstance(x, ShardedArray):
        features: Any = x.subset(rows)
    elif isinstance(x, np.memmap) and x.filename is not None:
        features = ShardedArray([x.filename]).subset(rows)
    else:
        features = x[rows]
    return FeatureSplit(
        features=features,
        labels=None if split.labels is None else split.labels[rows],
        ids=split.ids[rows],
        images=None if split.images is None else split.images[rows],
    )


def zero_row_mask(features: FeatureArray) -> np.ndarray:
    """[N] bool: rows whose entries are all 0 (read in chunks: memory maps stay flat)."""
    out = np.empty(features.shape[0], dtype=bool)
    for start in range(0, features.shape[0], CHUNK_ROWS):
        block = np.asarray(features[start : start + CHUNK_ROWS])
        out[start : start + block.shape[0]] = ~block.any(axis=1)
    return out


def count_zero_rows(train: FeatureSplit, val: FeatureSplit) -> ZeroRows:
    """The all-zero rows of splits that were not counted at load (policy "keep")."""
    return ZeroRows(
        "keep", int(zero_row_mask(train.features).sum()), int(zero_row_mask(val.features).sum())
    )
