"""The unit of work: a planned batch of listing positions, decoded, then encoded.

Batches never cross a shard boundary: shard k holds listing ids
[k * shard_rows, (k + 1) * shard_rows) minus the bad images, and is cut into
batches from its first id. A resumed run therefore encodes exactly the
batches an uninterrupted run would, so the stores are identical bit for bit
(batch composition can change float results on GPUs and in BLAS kernels).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monoray.extract.encoders import Preprocess
from monoray.extract.sources import Source


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Listing positions [start, stop) of one batch, all inside shard `chunk`."""

    chunk: int
    """Shard index this batch belongs to."""
    start: int
    """First listing position (= sample id)."""
    stop: int
    """One past the last listing position."""


def plan_batches(
    n: int, *, shard_rows: int, batch_size: int, first_chunk: int = 0
) -> list[BatchPlan]:
    """Batches of `batch_size` covering ids [first_chunk * shard_rows, n), cut at shard edges."""
    plans = []
    for chunk in range(first_chunk, -(-n // shard_rows)):
        lo, hi = chunk * shard_rows, min(n, (chunk + 1) * shard_rows)
        plans += [BatchPlan(chunk, a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)]
    return plans


@dataclass(frozen=True, slots=True)
class BadImage:
    """An image that could not be read or preprocessed."""

    id: int
    """Sample id (listing position)."""
    path: str
    """Where the image is (file path, or "file#row" inside an archive)."""
    error: str
    """Exception type and message."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (one line of `bad_images.jsonl`)."""
        return {"id": self.id, "path": self.path, "error": self.error}


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """Preprocessed pixels of the good images of one planned batch."""

    plan: BatchPlan
    """Which batch this is."""
    ids: np.ndarray
    """[n_ok] int64 sample ids of the good images."""
    labels: np.ndarray | None
    """[n_ok] int64 labels (None for an unlabelled source)."""
    pixels: Any
    """uint8 torch tensor [n_ok, H, W, 3]."""
    bad: tuple[BadImage, ...]
    """The images of the batch that failed, in id order."""

    def pin_memory(self) -> DecodedBatch:
        """Copy with page-locked pixels (the DataLoader calls this when `pin_memory=True`)."""
        return DecodedBatch(self.plan, self.ids, self.labels, self.pixels.pin_memory(), self.bad)


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """Features of the good images of one planned batch, ready for the store."""

    plan: BatchPlan
    """Which batch this is."""
    ids: np.ndarray
    """[n_ok] int64 sample ids."""
    labels: np.ndarray | None
    """[n_ok] int64 labels, or None."""
    features: np.ndarray
    """[n_ok, d] float32 features."""
    bad: tuple[BadImage, ...]
    """The images of the batch that failed."""


def decode_batch(
    plan: BatchPlan,
    refs: Sequence[str],
    labels: np.ndarray | None,
    *,
    source: Source,
    preprocess: Preprocess,
) -> DecodedBatch:
    """Load and preprocess `refs` (the listing slice of `plan`); failures become `BadImage`s."""
    import torch

    ok_rows: list[int] = []
    arrays: list[np.ndarray] = []
    bad: list[BadImage] = []
    for i, ref in enumerate(refs):
        try:
            arrays.append(preprocess(source.load(ref)))
        except Exception as err:  # any decoder failure is a bad image, reported, never silent
            msg = " ".join(str(err).split())[:300]
            bad.append(
                BadImage(plan.start + i, source.location(ref), f"{type(err).__name__}: {msg}")
            )
            continue
        ok_rows.append(i)
    rows = np.asarray(ok_rows, dtype=np.int64)
    h, w = preprocess.size
    pixels = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
    return DecodedBatch(
        plan=plan,
        ids=plan.start + rows,
        labels=None if labels is None else np.asarray(labels, np.int64)[rows],
        pixels=torch.from_numpy(pixels),
        bad=tuple(bad),
    )


def bad_to_json(bad: Sequence[BadImage]) -> str:
    """Compact JSON of a batch's bad images (how they travel through Ray Data)."""
    return json.dumps([b.to_dict() for b in bad])


def bad_from_json(text: str) -> tuple[BadImage, ...]:
    """Inverse of `bad_to_json`."""
    return tuple(BadImage(int(d["id"]), str(d["path"]), str(d["error"])) for d in json.loads(text))
