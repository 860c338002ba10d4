"""The Ray Data path of `monoray extract` (shared local Ray, one CPU actor) against local mode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from monoray.data import open_store
from monoray.extract import BAD_IMAGES, EncoderSpec, ExtractConfig, extract, read_bad_images
from monoray.extract.distributed import RayOptions

pytestmark = pytest.mark.integration


class _Crash(RuntimeError):
    pass


def _crash(info):
    raise _Crash


def test_ray_resumes_a_crashed_store_and_equals_local_mode(tmp_path, ray_session):
    """Local run killed after shard 0, finished on Ray: byte-equal to an uninterrupted local run
    (ImageFolder with a corrupt file in the part Ray does, so its report is checked too)."""
    import torch

    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for i in range(14):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i:02d}.png")
    (root / "c1" / "99_corrupt.png").write_bytes(b"\x89PNG broken")
    cfg = ExtractConfig(
        encoder=EncoderSpec("vit-ti16", "random-init", image_size=32),
        images=str(root),
        out=tmp_path / "local",
        batch_size=4,
        shard_rows=8,
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

    opts = RayOptions(workers=1, gpus_per_worker=0)
    r = extract(dataclasses.replace(cfg, out=out), ray=opts)
    assert (r.n_resumed, r.n_written, r.n_bad, r.n_batches) == (8, 6, 1, 2)
    assert (out / "shard-00000.npy").stat().st_mtime_ns == first
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert [b.id for b in read_bad_images(out / BAD_IMAGES)] == [14]
    header, _ = open_store(out, verify_checksums=True)
    assert header.n_samples == local.header.n_samples == 14
    assert header.extra["precision"] == "float32"
