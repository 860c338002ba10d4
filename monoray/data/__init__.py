"""Feature sets for SAE training: built-in digits, `.npz` files and sharded stores.

Entry point: `load_features(source, *, val_source=None, seed=0, val_fraction=0.2)`.
"""

from monoray.data.load import (
    DIGITS,
    DIGITS_MIN_INK,
    load_digits,
    load_features,
    load_npz,
    load_source,
    split_random,
    take_rows,
)
from monoray.data.sharded import ShardedArray
from monoray.data.store import FeatureStoreWriter, open_store, read_header
from monoray.data.types import (
    ZERO_ROWS,
    DataSource,
    FeatureArray,
    FeatureSplit,
    FeatureSplits,
    ShardInfo,
    StoreHeader,
    ZeroRows,
)
from monoray.data.validate import check_dim

__all__ = [
    "DIGITS",
    "DIGITS_MIN_INK",
    "ZERO_ROWS",
    "DataSource",
    "FeatureArray",
    "FeatureSplit",
    "FeatureSplits",
    "FeatureStoreWriter",
    "ShardInfo",
    "ShardedArray",
    "StoreHeader",
    "ZeroRows",
    "check_dim",
    "load_digits",
    "load_features",
    "load_npz",
    "load_source",
    "open_store",
    "read_header",
    "split_random",
    "take_rows",
]
