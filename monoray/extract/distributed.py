"""The Ray Data path: decode tasks -> encoder actor pool (GPUs) -> the driver's store writer.

The dataset has one row per planned batch (`BatchPlan`: a fixed id range
inside one shard) rather than one row per image, so every batch reaches the
encoder exactly as in local mode and a resumed run reproduces the store bit
for bit. Pipeline::

    from_items(plans)                               one block per planned batch
      .map_batches(_decode, batch_size=1)           CPU tasks: read + resize/crop -> uint8
      .map_batches(EncoderActor, batch_size=1,      actor pool, `num_gpus` each
                   compute=ActorPoolStrategy(size=workers))
      .iter_rows()                                  streamed, in order (preserve_order)

Decoded pixels travel padded to `batch_size` rows, so tensor columns keep one
shape. With GPU actors, decode tasks and encoder actors are separate operators;
on a CPU-only cluster they have the same resources and Ray fuses decoding into
the encoder actors (unless `decode_tasks` caps the decode stage). The driver
holds the listing (paths and labels), never the images or all features: Ray
Data streams with backpressure.

On a cluster, every node needs the images and the weight file at the same
paths, and `monoray` importable (e.g. a `runtime_env`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from monoray.errors import InputError
from monoray.extract.batches import (
    BatchPlan,
    EncodedBatch,
    bad_from_json,
    bad_to_json,
    decode_batch,
)
from monoray.extract.encoders import (
    Encoder,
    EncoderInfo,
    EncoderSpec,
    Preprocess,
    with_weights_file,
)
from monoray.extract.sources import Listing, Source
from monoray.runs.cluster import start_ray


@dataclass(frozen=True, slots=True)
class RayOptions:
    """Where and how wide the Ray Data pipeline runs."""

    address: str | None = None
    """Ray cluster address (`monoray.runs.cluster.start_ray`); None: $RAY_ADDRESS, else a local Ray."""
    workers: int = 1
    """Encoder actors, one model copy each (near-linear speed-up while GPUs are the bottleneck)."""
    gpus_per_worker: float | None = None
    """GPUs per encoder actor; None: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per encoder actor (its torch threads when it runs on CPU)."""
    decode_cpus: float = 1.0
    """CPUs reserved per decode task."""
    decode_tasks: int | None = None
    """Most decode tasks running at once (None: as many as the free CPUs allow)."""


def connect(opts: RayOptions) -> RayOptions:
    """Join (or start) Ray and resolve `gpus_per_worker`; `InputError` if the cluster cannot fit it."""
    import ray

    if opts.workers < 1:
        raise InputError(f"--workers must be >= 1, got {opts.workers}")
    if opts.decode_tasks is not None and opts.decode_tasks < 1:
        raise InputError(f"--decode-tasks must be >= 1, got {opts.decode_tasks}")
    if opts.cpus_per_worker <= 0 or opts.decode_cpus <= 0:
        raise InputError("--cpus-per-worker and decode CPUs must be > 0")
    if opts.gpus_per_worker is not None and opts.gpus_per_worker < 0:
        raise InputError(f"--gpus-per-worker must be >= 0, got {opts.gpus_per_worker}")
    start_ray(opts.address)
    have = ray.cluster_resources().get("GPU", 0)
    gpus = opts.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if have >= 1 else 0.0
    if gpus > 0 and have < gpus:
        raise InputError(f"an encoder worker needs {gpus:g} GPU but the Ray cluster has {have:g}")
    return dataclasses.replace(opts, gpus_per_worker=gpus)


def run_distributed(
    plans: list[BatchPlan],
    source: Source,
    listing: Listing,
    info: EncoderInfo,
    spec: EncoderSpec,
    *,
    batch_size: int,
    opts: RayOptions,
) -> Iterator[EncodedBatch]:
    """Encoded batches of `plans`, in plan order, computed by a Ray Data pipeline.

    `spec.precision` should be resolved already (it is what the header records).
    """
    if not plans:
        return
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    gpus = float(opts.gpus_per_worker or 0.0)
    spec = dataclasses.replace(with_weights_file(spec, info), device="cuda" if gpus > 0 else "cpu")
    labels = listing.labels
    rows = [
        {
            "chunk": p.chunk,
            "start": p.start,
            "stop": p.stop,
            "refs": list(listing.refs[p.start : p.stop]),
            "labels": [-1] * (p.stop - p.start)
            if labels is None
            else labels[p.start : p.stop].tolist(),
        }
        for p in plans
    ]
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # the store is written in id order
    ctx.enable_progress_bars = False  # the driver shows one bar for the whole run
    try:
        ds = (
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map_batches(
                _decode,
                batch_size=1,
                compute=None if opts.decode_tasks is None else TaskPoolStrategy(opts.decode_tasks),
                num_cpus=opts.decode_cpus,
                fn_kwargs={
                    "source": source,
                    "preprocess": info.preprocess,
                    "batch_size": batch_size,
                    "has_labels": labels is not None,
                },
            )
            .map_batches(
                EncoderActor,
                batch_size=1,
                compute=ActorPoolStrategy(size=opts.workers),
                num_gpus=gpus or None,
                num_cpus=opts.cpus_per_worker,
                fn_constructor_kwargs={
                    "spec": spec,
                    "info": info,
                    "threads": max(1, int(opts.cpus_per_worker)),
                },
            )
        )
        for row in ds.iter_rows():
            yield _to_encoded(row, has_labels=labels is not None)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _decode(
    batch: dict[str, np.ndarray],
    *,
    source: Source,
    preprocess: Preprocess,
    batch_size: int,
    has_labels: bool,
) -> dict[str, np.ndarray]:
    """One planned batch -> padded uint8 pixels [1, B, H, W, 3] plus ids, labels, bad images."""
    plan = BatchPlan(int(batch["chunk"][0]), int(batch["start"][0]), int(batch["stop"][0]))
    refs = [str(r) for r in batch["refs"][0]]
    labels = np.asarray(batch["labels"][0], np.int64) if has_labels else None
    dec = decode_batch(plan, refs, labels, source=source, preprocess=preprocess)
    n_ok = int(dec.ids.size)
    h, w = preprocess.size
    pixels = np.zeros((1, batch_size, h, w, 3), np.uint8)
    pixels[0, :n_ok] = dec.pixels.numpy()
    return {
        "chunk": np.asarray([plan.chunk]),
        "start": np.asarray([plan.start]),
        "stop": np.asarray([plan.stop]),
        "n_ok": np.asarray([n_ok]),
        "ids": _pad(dec.ids, batch_size),
        "labels": _pad(dec.labels if dec.labels is not None else np.zeros(0, np.int64), batch_size),
        "pixels": pixels,
        "bad": np.asarray([bad_to_json(dec.bad)]),
    }


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    out = np.full((1, n), -1, np.int64)
    out[0, : a.size] = a
    return out


class EncoderActor:
    """Ray Data actor: holds one encoder on its device; one planned batch per call."""

    def __init__(self, spec: EncoderSpec, info: EncoderInfo, threads: int = 1) -> None:
        import torch

        if spec.device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = Encoder(spec, info)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_ok = int(batch["n_ok"][0])
        pixels = batch["pixels"][0, :n_ok]
        if not pixels.flags.writeable:  # zero-copy views of the object store are read-only
            pixels = pixels.copy()
        features = self.encoder.encode(pixels)
        padded = np.zeros((1, batch["pixels"].shape[1], self.encoder.dim), np.float32)
        padded[0, :n_ok] = features
        out = {k: batch[k] for k in ("chunk", "start", "stop", "n_ok", "ids", "labels", "bad")}
        out["features"] = padded
        return out


def _to_encoded(row: dict[str, Any], *, has_labels: bool) -> EncodedBatch:
    n_ok = int(row["n_ok"])
    plan = BatchPlan(int(row["chunk"]), int(row["start"]), int(row["stop"]))
    return EncodedBatch(
        plan=plan,
        ids=np.asarray(row["ids"][:n_ok], np.int64),
        labels=np.asarray(row["labels"][:n_ok], np.int64) if has_labels else None,
        features=np.asarray(row["features"][:n_ok], np.float32),
        bad=bad_from_json(str(row["bad"])),
    )
