"""The Ray Data path of `monoray extract` (shared local Ray, one CPU actor) against local mode."""

from __future__ import annotations

import dataclasses

import pytest

from monoray.data import open_store
from monoray.extract import EncoderSpec, ExtractConfig, extract
from monoray.extract.distributed import RayOptions

pytestmark = pytest.mark.integration


class _Crash(RuntimeError):
    pass


def _crash(info):
    raise _Crash


def test_ray_resumes_a_crashed_store_and_equals_local_mode(tmp_path, ray_session):
    """Local run killed after shard 0, finished on Ray: byte-equal to an uninterrupted local run."""
    import torch

    cfg = ExtractConfig(
        encoder=EncoderSpec("vit-ti16", "random-init", image_size=32),
        images="digits",
        out=tmp_path / "local",
        limit=40,
        batch_size=8,
        shard_rows=16,
        loader_workers=0,
        progress=False,
    )
    out = tmp_path / "mixed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = extract(cfg)
        with pytest.raises(_Crash):
            extract(dataclasses.replace(cfg, out=out), on_shard=_crash)
    finally:
        torch.set_num_threads(threads)
    first = (out / "shard-00000.npy").stat().st_mtime_ns

    opts = RayOptions(workers=1, gpus_per_worker=0, decode_tasks=1)
    r = extract(dataclasses.replace(cfg, out=out), ray=opts)
    assert (r.n_resumed, r.n_written, r.n_batches) == (16, 24, 3)
    assert (out / "shard-00000.npy").stat().st_mtime_ns == first
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    header, _ = open_store(out, verify_checksums=True)
    assert header.n_samples == local.header.n_samples == 40
    assert header.extra["precision"] == "float32"
