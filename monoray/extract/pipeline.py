"""`extract(cfg)`: images -> frozen encoder -> sharded feature store, resumable.

One driver loop consumes encoded batches in id order and writes them through
`monoray.data.FeatureStoreWriter`; the batches come either from a local
`torch.utils.data.DataLoader` (decode in worker processes, encode in this
process: the default, for a laptop or one GPU) or from a Ray Data pipeline
(`monoray.extract.distributed`: decode tasks + an encoder actor pool across a
cluster).

Resume: shard k always holds ids [k * shard_rows, (k + 1) * shard_rows) minus
bad images. Re-running the same command on an unfinished store checks that
the listing, encoder, weights and batching are unchanged, keeps the finished
shards (their files are not touched) and continues with the next one; the
result equals an uninterrupted run byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monoray.data.store import HEADER, FeatureStoreWriter, read_header
from monoray.data.types import DTYPES, ShardInfo, StoreHeader
from monoray.errors import InputError
from monoray.extract.batches import (
    BatchPlan,
    DecodedBatch,
    EncodedBatch,
    decode_batch,
    plan_batches,
)
from monoray.extract.encoders import (
    Encoder,
    EncoderInfo,
    EncoderSpec,
    describe_encoder,
    resolve_device,
    resolve_precision,
)
from monoray.extract.report import BAD_IMAGES, BadImageReport
from monoray.extract.sources import Listing, Source, open_source

if TYPE_CHECKING:
    from monoray.extract.distributed import RayOptions

ON_BAD_IMAGE = ("skip", "fail")
"""What to do with an unreadable image: skip it (and report it) or stop with an error."""
RESUME_KEYS = (
    "listing_sha256",
    "weights",
    "image_size",
    "precision",
    "batch_size",
    "shard_rows",
)
"""Header `extra` keys that must match for a run to continue an existing store."""


@dataclass(frozen=True, slots=True)
class ExtractConfig:
    """One extraction: which images, which encoder, where to, and how to batch."""

    encoder: EncoderSpec
    """The encoder, its weights, device, precision and normalisation."""
    images: str
    """"digits", an ImageFolder/flat image folder, a CIFAR python dir or a .csv/.parquet list."""
    out: Path
    """Feature-store directory (created, or resumed if it holds an unfinished store)."""
    split: str | None = None
    """CIFAR split, "train" (default) or "test"; other sources take none."""
    image_root: str | None = None
    """Folder that relative paths in a .csv/.parquet listing resolve against (default: its folder)."""
    limit: int | None = None
    """Only the first `limit` images of the listing (smoke runs)."""
    batch_size: int = 64
    """Images per encoder call."""
    shard_rows: int = 16384
    """Listing ids per shard: the unit of resume."""
    dtype: str = "float16"
    """Storage dtype of the features, "float16" or "float32"."""
    on_bad_image: str = "skip"
    """"skip": report unreadable images in bad_images.jsonl and go on; "fail": stop with an error."""
    loader_workers: int | None = None
    """Decode worker processes in local mode (None: cores - 1, at most 8; 0: decode inline)."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """What an extraction did."""

    path: Path
    """The store directory."""
    header: StoreHeader
    """The final header."""
    n_listed: int
    """Images in the listing (after `limit`)."""
    n_resumed: int
    """Samples already in finished shards before this run (not recomputed)."""
    n_written: int
    """Samples encoded and written by this run."""
    n_bad: int
    """Images skipped in the whole store (see `bad_images`)."""
    n_batches: int
    """Encoder calls this run."""
    seconds: float
    """Wall time of the decode/encode/write loop of this run."""
    bad_images: Path
    """The bad-image report."""

    @property
    def images_per_s(self) -> float:
        """Throughput of this run (written samples per second of the loop)."""
        return self.n_written / self.seconds if self.seconds > 0 else 0.0


def extract(
    cfg: ExtractConfig,
    *,
    ray: RayOptions | None = None,
    on_shard: Callable[[ShardInfo], None] | None = None,
) -> ExtractResult:
    """Extract features of `cfg.images` into the store `cfg.out` (resuming it if unfinished).

    `ray` selects the Ray Data path (None: local DataLoader loop). `on_shard` is
    called after each finished shard (progress hooks; tests inject crashes).
    """
    _check_config(cfg)
    source = open_source(cfg.images, split=cfg.split, image_root=cfg.image_root)
    listing = source.listing().head(cfg.limit)
    info = describe_encoder(cfg.encoder)
    if ray is not None:
        from monoray.extract.distributed import connect

        ray = connect(ray)
        device_type = "cuda" if ray.gpus_per_worker else "cpu"
    else:
        device_type = resolve_device(cfg.encoder.device).type
    precision = resolve_precision(cfg.encoder.precision, device_type)
    extra = _header_extra(cfg, source, listing, info, precision)
    out = Path(cfg.out)
    first_chunk = _check_out(out, cfg, info, extra)
    plans = plan_batches(
        len(listing), shard_rows=cfg.shard_rows, batch_size=cfg.batch_size, first_chunk=first_chunk
    )
    spec = dataclasses.replace(cfg.encoder, precision=precision)
    # Local mode loads the weights before touching `out`: a bad weight file leaves no store.
    encoder = Encoder(spec, info) if ray is None and plans else None

    writer = FeatureStoreWriter(
        out,
        encoder=cfg.encoder.name,
        dim=info.dim,
        dtype=cfg.dtype,
        normalisation=cfg.encoder.normalize,
        has_labels=listing.labels is not None,
        shard_rows=cfg.shard_rows,
        extra=extra,
    )
    n_resumed = writer.n_samples
    report = BadImageReport(out, resume_from=first_chunk * cfg.shard_rows)
    sink = _StoreSink(writer, report, fail_on_bad=cfg.on_bad_image == "fail", on_shard=on_shard)
    done_before = min(len(listing), first_chunk * cfg.shard_rows)
    if ray is None:
        batches = _run_local(plans, source, listing, info, cfg, encoder)
    else:
        from monoray.extract.distributed import run_distributed

        batches = run_distributed(
            plans, source, listing, info, spec, batch_size=cfg.batch_size, opts=ray
        )
    with _Progress(len(listing), done_before, enabled=cfg.progress) as bar:
        t0 = time.perf_counter()
        n_batches = 0
        for batch in batches:
            sink.add(batch)
            n_batches += 1
            bar.advance(batch.plan.stop - batch.plan.start)
        sink.finish()
        seconds = time.perf_counter() - t0
    header = writer.close()
    return ExtractResult(
        path=out,
        header=header,
        n_listed=len(listing),
        n_resumed=n_resumed,
        n_written=header.n_samples - n_resumed,
        n_bad=report.count,
        n_batches=n_batches,
        seconds=seconds,
        bad_images=report.path,
    )


def _check_config(cfg: ExtractConfig) -> None:
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.shard_rows < 1:
        raise InputError(f"--shard-rows must be >= 1, got {cfg.shard_rows}")
    if cfg.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.on_bad_image not in ON_BAD_IMAGE:
        raise InputError(f"--on-bad-image must be one of {', '.join(ON_BAD_IMAGE)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise InputError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.loader_workers is not None and cfg.loader_workers < 0:
        raise InputError(f"--loader-workers must be >= 0, got {cfg.loader_workers}")


def _header_extra(
    cfg: ExtractConfig, source: Source, listing: Listing, info: EncoderInfo, precision: str
) -> dict[str, Any]:
    entry = info.entry
    return {
        "source": source.describe(),
        "listing_sha256": listing.fingerprint(),
        "n_listed": len(listing),
        "classes": list(listing.classes),
        "library": entry.library,
        "arch": entry.arch,
        "tag": entry.tag,
        "weights": info.weights_id,
        "image_size": list(info.preprocess.size),
        "precision": precision,
        "batch_size": cfg.batch_size,
        "shard_rows": cfg.shard_rows,
        "bad_images": BAD_IMAGES,
    }


def _check_out(out: Path, cfg: ExtractConfig, info: EncoderInfo, extra: dict[str, Any]) -> int:
    """Check that `out` is new, empty, or a store of this same extraction; return the first
    shard index still to do. A store left with no finished shard is started afresh."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.exists() and (out / HEADER).exists():
        old = read_header(out)
        if not old.shards and old.extra.get("complete") is False:
            for name in (HEADER, BAD_IMAGES):  # nothing finished: nothing to keep or match
                (out / name).unlink(missing_ok=True)
    if not out.exists() or not (out / HEADER).exists():
        if out.exists() and any(p.name != BAD_IMAGES for p in out.iterdir()):
            raise InputError(f"{out}/: not empty and not a feature store; choose a new --out")
        return 0
    want = {
        "encoder": cfg.encoder.name,
        "dim": info.dim,
        "dtype": cfg.dtype,
        "normalisation": cfg.encoder.normalize,
    }
    for key, value in want.items():
        if getattr(old, key) != value:
            raise _mismatch(out, key, getattr(old, key), value)
    for key in RESUME_KEYS:
        if old.extra.get(key) != extra[key]:
            raise _mismatch(out, key, old.extra.get(key), extra[key])
    return _next_chunk(out, old, cfg.shard_rows)


def _mismatch(out: Path, key: str, old: Any, new: Any) -> InputError:
    return InputError(
        f"{out}/: holds an extraction with {key}={old!r}, this run has {new!r}; "
        "use the same settings to resume, or a new --out"
    )


def _next_chunk(out: Path, header: StoreHeader, shard_rows: int) -> int:
    """First shard index with ids not yet on disk (shard k holds ids [k*rows, (k+1)*rows))."""
    if not header.shards:
        return 0
    last = header.shards[-1]
    try:
        ids = np.load(out / last.ids_file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{out}/: cannot read {last.ids_file}: {err}") from None
    return int(ids.max()) // shard_rows + 1


class _StoreSink:
    """Writes encoded batches in order: bad-image lines first, then features; one shard per chunk."""

    def __init__(
        self,
        writer: FeatureStoreWriter,
        report: BadImageReport,
        *,
        fail_on_bad: bool,
        on_shard: Callable[[ShardInfo], None] | None,
    ) -> None:
        self.writer, self.report = writer, report
        self.fail_on_bad, self.on_shard = fail_on_bad, on_shard
        self.chunk: int | None = None

    def add(self, batch: EncodedBatch) -> None:
        if self.chunk is not None and batch.plan.chunk != self.chunk:
            self._end_chunk()
        self.chunk = batch.plan.chunk
        if batch.bad and self.fail_on_bad:
            b = batch.bad[0]
            raise InputError(
                f"{b.path}: unreadable image ({b.error}); pass --on-bad-image skip to skip "
                "and report such files"
            )
        self.report.add(batch.bad)  # before the shard that skips them is written
        if batch.ids.size:
            before = self.writer.n_samples
            self.writer.append(batch.features, batch.ids, batch.labels)
            self._notify(before)

    def finish(self) -> None:
        if self.chunk is not None:
            self._end_chunk()

    def _end_chunk(self) -> None:
        before = self.writer.n_samples
        self.writer.flush()  # a chunk with bad images is short; write it as its own shard
        self._notify(before)

    def _notify(self, before: int) -> None:
        if self.on_shard is not None and self.writer.n_samples != before:
            self.on_shard(self.writer.header.shards[-1])


# --- local mode -----------------------------------------------------------------


class _PlannedBatches:
    """Map-style dataset: item i = the decoded batch `plans[i]` (decoded in loader workers)."""

    def __init__(
        self, plans: list[BatchPlan], source: Source, listing: Listing, info: EncoderInfo
    ) -> None:
        self.plans, self.source, self.listing, self.info = plans, source, listing, info

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> DecodedBatch:
        p = self.plans[i]
        labels = self.listing.labels
        return decode_batch(
            p,
            self.listing.refs[p.start : p.stop],
            None if labels is None else labels[p.start : p.stop],
            source=self.source,
            preprocess=self.info.preprocess,
        )


def _identity(batch: DecodedBatch) -> DecodedBatch:
    return batch


def default_loader_workers() -> int:
    """Decode processes for local mode: all cores but one, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _run_local(
    plans: list[BatchPlan],
    source: Source,
    listing: Listing,
    info: EncoderInfo,
    cfg: ExtractConfig,
    encoder: Encoder | None,
) -> Iterator[EncodedBatch]:
    """Decode in DataLoader workers (in order, prefetching), encode here."""
    from torch.utils.data import DataLoader

    if not plans or encoder is None:
        return
    workers = default_loader_workers() if cfg.loader_workers is None else cfg.loader_workers
    workers = min(workers, len(plans))
    loader = DataLoader(
        _PlannedBatches(plans, source, listing, info),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for dec in loader:
        features = encoder.encode(dec.pixels)
        yield EncodedBatch(dec.plan, dec.ids, dec.labels, features, dec.bad)


# --- progress -------------------------------------------------------------------


class _Progress:
    """A rich progress bar on stderr (images done, images/s), or nothing."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("extract"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._task = self._bar.add_task(
                "extract", total=self.total, completed=self.done, rate=""
            )
            self._t0, self._start_done = time.perf_counter(), self.done
            self._bar.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            dt = time.perf_counter() - self._t0
            rate = f"{(self.done - self._start_done) / dt:.1f} img/s" if dt > 0 else ""
            self._bar.update(self._task, completed=self.done, rate=rate)

    def __exit__(self, *_: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
