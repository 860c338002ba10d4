"""All-zero feature rows (flat patches, padding tokens, blank images): counted at load,
then kept, dropped or refused (`zero_rows`).

`keep` (default) follows the reference: such a row has similarity 0 with every
sample in MonoScore and MonoLoss (`monoray.metrics`), so numbers compare with
the paper's code. `drop` removes the rows from their split; `error` refuses
the data with one line.
"""

from __future__ import annotations

import numpy as np

from monoray.data.types import ZERO_ROWS, FeatureSplit, ZeroRows, take_rows, zero_row_mask
from monoray.errors import InputError


def check_policy(policy: str) -> str:
    if policy not in ZERO_ROWS:
        raise InputError(f"zero_rows must be one of {', '.join(ZERO_ROWS)}, got {policy!r}")
    return policy


def apply_zero_rows(
    train: FeatureSplit, val: FeatureSplit, policy: str, *, where: str
) -> tuple[FeatureSplit, FeatureSplit, ZeroRows]:
    """Count the all-zero rows of both splits and apply `policy` (see `ZERO_ROWS`)."""
    check_policy(policy)
    masks = {"train": zero_row_mask(train.features), "val": zero_row_mask(val.features)}
    found = ZeroRows(policy, int(masks["train"].sum()), int(masks["val"].sum()))
    if policy == "error" and (found.train or found.val):
        name, split = ("train", train) if found.train else ("val", val)
        first = int(split.ids[np.flatnonzero(masks[name])[0]])
        raise InputError(
            f"{where}: {found.train + found.val} all-zero feature rows ({found.train} train, "
            f"{found.val} val; first: {name} sample id {first}); use zero_rows keep or drop"
        )
    if policy == "drop":
        for name, mask in masks.items():
            if mask.all():
                raise InputError(f"{where}: every row of the {name} split is all zeros")
        if found.train:
            train = take_rows(train, np.flatnonzero(~masks["train"]))
        if found.val:
            val = take_rows(val, np.flatnonzero(~masks["val"]))
    return train, val, found
