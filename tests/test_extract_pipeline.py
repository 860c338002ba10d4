"""`monoray extract` end to end on CPU with random-init encoders at 32 px: digits through
CLIP ViT-B/32 then SAE training, an ImageFolder with corrupt files, crash + resume, the CLI
(most tests use the small ViT-Ti/16 to stay fast on 2 shared cores)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from monoray.data import load_features, open_store
from monoray.errors import InputError
from monoray.extract import BAD_IMAGES, EncoderSpec, ExtractConfig, extract, read_bad_images
from monoray.train import TrainConfig, train_sae

SPEC = EncoderSpec("vit-ti16", "random-init", image_size=32)
CLIP = EncoderSpec("clip-vit-b32", "random-init", image_size=32)


def _cfg(images, out, encoder=SPEC, **kw) -> ExtractConfig:
    base = dict(batch_size=8, shard_rows=8, loader_workers=0, progress=False)
    return ExtractConfig(encoder=encoder, images=str(images), out=out, **{**base, **kw})


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small models on 2 shared cores run ~8x faster with 1 thread (no OpenMP barrier waits)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder: a/ 5 PNGs + a corrupt one, b/ 5 PNGs + a truncated one (12 files, ids 0-11)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(5):
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls}{i}.png")
    (root / "a" / "zz_corrupt.png").write_bytes(b"this is not a png")
    full = (root / "b" / "b0.png").read_bytes()
    (root / "b" / "zz_truncated.png").write_bytes(full[: len(full) // 2])
    return root


def test_extract_digits_then_train_an_sae(tmp_path):
    out = tmp_path / "digits"
    r = extract(_cfg("digits", out, CLIP, limit=48, batch_size=16, shard_rows=32))
    h = r.header
    assert (h.encoder, h.dim, h.dtype, h.normalisation, h.n_samples) == (
        "clip-vit-b32",
        512,
        "float16",
        "unit",
        48,
    )
    assert [s.rows for s in h.shards] == [32, 16] and h.extra["complete"] is True
    assert h.extra["source"] == {"kind": "digits"} and h.extra["weights"] == "random-init seed=0"
    assert (r.n_written, r.n_resumed, r.n_bad, r.n_batches) == (48, 0, 0, 3)
    assert r.images_per_s > 0
    _, whole = open_store(out, verify_checksums=True)
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(whole.ids, np.arange(48))
    np.testing.assert_array_equal(whole.labels, load_digits().target[:48])
    norms = np.linalg.norm(np.asarray(whole.features, np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)

    splits = load_features(out)
    assert len(splits.train) + len(splits.val) == 48
    cfg = TrainConfig.from_dict(
        {"arch": "batchtopk", "d_in": 512, "d_sae": 64, "k": 8, "epochs": 1, "batch_size": 16}
        | {"device": "cpu"}
    )
    metrics = train_sae(cfg, splits, out_dir=tmp_path / "sae", progress=False)
    assert np.isfinite(metrics["r2"])


def test_imagefolder_skips_and_reports_corrupt_images(tmp_path, folder):
    out = tmp_path / "store"
    r = extract(_cfg(folder, out, batch_size=4, shard_rows=4, loader_workers=1))  # decode process
    assert r.n_bad == 2 and r.header.n_samples == 10
    _, whole = open_store(out)
    assert whole.ids.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert whole.labels.tolist() == [0] * 5 + [1] * 5
    assert [s.rows for s in r.header.shards] == [4, 3, 3]
    bad = read_bad_images(out / BAD_IMAGES)
    assert [(b.id, os.path.basename(b.path)) for b in bad] == [
        (5, "zz_corrupt.png"),
        (11, "zz_truncated.png"),
    ]
    assert "UnidentifiedImageError" in bad[0].error and "truncated" in bad[1].error
    assert r.header.extra["classes"] == ["a", "b"]


def test_on_bad_image_fail_names_the_file(tmp_path, folder):
    with pytest.raises(InputError, match=r"zz_corrupt.png: unreadable image"):
        extract(_cfg(folder, tmp_path / "store", on_bad_image="fail"))


class _Crash(RuntimeError):
    pass


def test_killed_extraction_resumes_without_recomputing(tmp_path, folder):
    cfg = _cfg(folder, tmp_path / "ref", batch_size=2, shard_rows=4)
    ref = extract(cfg)
    assert ref.n_batches == 6

    out = tmp_path / "resumed"
    seen = []

    def crash_after_first_shard(info):
        seen.append(info.index)
        raise _Crash

    with pytest.raises(_Crash):
        extract(dataclasses.replace(cfg, out=out), on_shard=crash_after_first_shard)
    assert seen == [0]
    with pytest.raises(InputError, match="incomplete"):
        open_store(out)
    first = (out / "shard-00000.npy").stat()
    # Leftovers of the unfinished shard that a crash can leave behind:
    (out / "shard-00001.npy").write_bytes(b"partial")
    with open(out / BAD_IMAGES, "a") as f:
        f.write('{"id": 5, "path": "x", "error": "from the crashed run"}\n{"id": 6, "pa')

    r = extract(dataclasses.replace(cfg, out=out))
    assert (r.n_resumed, r.n_written, r.n_batches) == (4, 6, 4)  # shard 0's 2 batches skipped
    again = (out / "shard-00000.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_rerun_of_a_finished_store_is_a_no_op_and_settings_must_match(tmp_path):
    cfg = _cfg("digits", tmp_path / "s", limit=8)
    extract(cfg)
    before = (tmp_path / "s" / "shard-00000.npy").stat().st_mtime_ns
    r = extract(cfg)
    assert (r.n_written, r.n_batches, r.n_resumed) == (0, 0, 8)
    assert (tmp_path / "s" / "shard-00000.npy").stat().st_mtime_ns == before
    with pytest.raises(InputError, match=r"batch_size=8, this run has 4"):
        extract(dataclasses.replace(cfg, batch_size=4))
    with pytest.raises(InputError, match="listing_sha256"):
        extract(dataclasses.replace(cfg, limit=9))
    with pytest.raises(InputError, match="dtype='float16', this run has 'float32'"):
        extract(dataclasses.replace(cfg, dtype="float32"))


def test_unloadable_weights_fail_before_the_store_is_created(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    spec = dataclasses.replace(SPEC, weights=str(garbage))
    with pytest.raises(InputError, match=r"garbage\.safetensors: cannot load weights for vit-ti16"):
        extract(_cfg("digits", tmp_path / "store", spec, limit=4))
    assert not (tmp_path / "store").exists()


def test_out_must_be_new_empty_or_a_store(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(InputError, match="not empty and not a feature store"):
        extract(_cfg("digits", tmp_path, limit=4))


def test_cli_extract(tmp_path, capsys):
    from monoray import cli

    out = tmp_path / "store"
    base = ["extract", "--encoder", "vit-ti16", "--images", "digits", "--out", str(out)]
    small = ["--image-size", "32", "--limit", "8", "--batch-size", "8", "--loader-workers", "0"]
    rc = cli.main([*base, "--random-init", *small, "--quiet", "--dtype", "float32"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "8 samples of vit-ti16 (dim 192, float32, normalisation unit)" in stdout
    assert "images/s" in stdout
    assert load_features(out).header.dtype == "float32"

    rc = cli.main([*base, "--weights", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "weight file not found" in err
    with pytest.raises(SystemExit) as exc:  # weights must be chosen explicitly
        cli.main(base)
    assert exc.value.code == 2


@pytest.mark.slow
def test_sigkilled_extraction_resumes_to_the_same_store(tmp_path):
    """A real `kill -9` mid-run (not a Python exception): resume equals an uninterrupted run."""
    import json
    import subprocess
    import sys
    import time

    kw = dict(limit=600, batch_size=8, shard_rows=32)
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from monoray.extract import EncoderSpec, ExtractConfig, extract\n"
        f"extract(ExtractConfig(encoder=EncoderSpec('vit-ti16', 'random-init', image_size=32),"
        f" images='digits', out=Path(sys.argv[1]), loader_workers=0, progress=False, **{kw!r}))\n"
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)])
    header = out / "header.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if header.exists() and json.loads(header.read_text())["shards"]:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    state = json.loads(header.read_text())
    if state["extra"]["complete"]:
        pytest.skip("the extraction finished before it could be killed")
    done = len(state["shards"])
    r = extract(_cfg("digits", out, **kw))
    assert r.n_resumed == 32 * done and r.header.n_samples == 600
    ref = extract(_cfg("digits", tmp_path / "ref", **kw))
    for name in sorted(p.name for p in (tmp_path / "ref").iterdir()):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert ref.n_resumed == 0
