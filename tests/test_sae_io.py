"""The SAE artifact (`monoray.sae.io`): load_sae(save_sae(...)) encodes and decodes bit for bit
as the saved SAE, for every architecture; bad, damaged or foreign files are one InputError line
and are never unpickled."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monoray.errors import InputError
from monoray.sae import ARCH_NAMES, TOPK_FAMILY, SAEConfig, SparseAutoencoder, build_sae
from monoray.sae.io import (
    CFG_FILE,
    WEIGHTS_FILE,
    InputNormalisation,
    inference_threshold,
    load_sae,
    read_sae,
    save_sae,
)

UNIT = InputNormalisation(applied="unit", features="none", encoder="digits-pixels")


def trained_like(arch: str, d_in: int, d_sae: int, k: int, seed: int) -> SparseAutoencoder:
    """An SAE whose every parameter and buffer moved off its init (as after training)."""
    budget = {"k": min(k, d_sae)} if arch in TOPK_FAMILY else {}
    sae = build_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, seed=seed, **budget))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        x = torch.randn(16, d_in, generator=gen)
        sae.forward_train(x)  # BatchTopK threshold, dead-latent counters
    return sae


def assert_same_encode_decode(a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor) -> None:
    la, lb = a.encode(x), b.encode(x)
    assert torch.equal(la.values, lb.values)
    assert torch.equal(la.col_indices, lb.col_indices)
    assert torch.equal(la.row_offsets, lb.row_offsets)
    assert torch.equal(a.decode(la), b.decode(lb))
    assert torch.equal(a.decode(la.to_dense()), b.decode(lb.to_dense()))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("arch", ARCH_NAMES)
@settings(max_examples=8)
@given(
    d_in=st.integers(1, 12),
    d_sae=st.integers(1, 40),
    k=st.integers(1, 8),
    batch=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_identical(arch, d_in, d_sae, k, batch, seed):
    sae = trained_like(arch, d_in, d_sae, k, seed)
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_sae(save_sae(sae, Path(tmp) / "sae", normalisation=UNIT))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert_same_encode_decode(sae, loaded, x)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_cfg_json_records_what_encode_needs(tmp_path, arch):
    sae = trained_like(arch, 6, 24, 3, seed=5)
    out = save_sae(sae, tmp_path / "sae", normalisation=UNIT, epoch=7, data={"features": "digits"})
    record = json.loads((out / CFG_FILE).read_text())
    assert record["format"] == "monoray-sae" and record["schema_version"] == 1
    assert record["architecture"] == arch and record["sae"]["d_sae"] == 24
    assert record["normalisation"] == {
        "applied": "unit",
        "features": "none",
        "encoder": "digits-pixels",
    }
    if arch in ("batchtopk", "matryoshka"):
        assert record["inference_threshold"] == pytest.approx(float(sae.threshold), abs=0)
        assert record["inference_threshold"] > 0
    else:
        assert record["inference_threshold"] is None
    art = read_sae(out)
    assert (art.epoch, art.data, art.normalisation) == (7, {"features": "digits"}, UNIT)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(art.prepare(x).norm(dim=1), torch.ones(1))


def test_save_replaces_an_artifact_but_no_other_directory(tmp_path):
    first = trained_like("topk", 4, 8, 2, seed=1)
    second = trained_like("topk", 4, 8, 2, seed=2)
    out = save_sae(first, tmp_path / "sae", normalisation=UNIT)
    save_sae(second, out, normalisation=UNIT)
    assert torch.equal(load_sae(out).W_enc, second.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporaries left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an SAE artifact; not overwriting"):
        save_sae(first, other, normalisation=UNIT)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="exists and is not a directory"):
        save_sae(first, other / "keep.txt", normalisation=UNIT)
    assert (other / "keep.txt").read_text() == "mine"


@pytest.fixture
def artifact(tmp_path) -> Path:
    return save_sae(
        trained_like("batchtopk", 5, 10, 2, seed=3), tmp_path / "sae", normalisation=UNIT
    )


def _rewrite(path: Path, **changes) -> None:
    record = json.loads((path / CFG_FILE).read_text())
    record.update(changes)
    (path / CFG_FILE).write_text(json.dumps(record))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_directory_and_files(tmp_path, artifact):
    with pytest.raises(InputError, match="no such directory") as err:
        load_sae(tmp_path / "nowhere")
    _one_line(err)
    (artifact / WEIGHTS_FILE).unlink()
    with pytest.raises(InputError, match=f"missing {WEIGHTS_FILE}"):
        load_sae(artifact)
    (artifact / CFG_FILE).unlink()
    with pytest.raises(InputError, match=f"not an SAE artifact \\(no {CFG_FILE}\\)"):
        load_sae(artifact)


def test_damaged_weights_fail_their_checksum(artifact):
    data = (artifact / WEIGHTS_FILE).read_bytes()
    (artifact / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="does not match its sha256") as err:
        load_sae(artifact)
    assert str(artifact) in _one_line(err)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "unreadable cfg.json"),
        ("[1, 2]", "not a monoray SAE artifact"),
        ('{"architecture": "topk"}', "not a monoray SAE artifact"),
    ],
)
def test_unreadable_or_foreign_cfg_json(artifact, text, match):
    (artifact / CFG_FILE).write_text(text)
    with pytest.raises(InputError, match=match) as err:
        load_sae(artifact)
    _one_line(err)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"schema_version": 99}, "artifact schema 99 is not supported"),
        ({"architecture": "topk"}, "architecture 'topk' does not match"),
        ({"normalisation": {"applied": "zscore"}}, "normalisation must be one of unit, none"),
        ({"normalisation": None}, "malformed"),
        ({"sae": {"arch": "batchtopk", "d_in": 5, "d_sae": 10, "k": 2, "colour": 1}}, "colour"),
        ({"sae": {"arch": "batchtopk", "d_in": 5, "d_sae": 12, "k": 2}}, "does not fit"),
    ],
)
def test_bad_cfg_json_fields(artifact, changes, match):
    _rewrite(artifact, **changes)
    with pytest.raises(InputError, match=match) as err:
        load_sae(artifact)
    _one_line(err)


def test_a_planted_pickle_is_refused_unopened(tmp_path, artifact):
    """A pickle named sae.safetensors, with a matching sha256, is refused and never run."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    (artifact / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload()))
    from monoray.runs.files import sha256_file

    _rewrite(artifact, sha256={WEIGHTS_FILE: sha256_file(artifact / WEIGHTS_FILE)})
    with pytest.raises(InputError, match=f"unreadable {WEIGHTS_FILE}") as err:
        load_sae(artifact)
    _one_line(err)
    assert not marker.exists()


def test_inference_threshold_is_the_clamped_buffer():
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=3, d_sae=4, k=1))
    sae.threshold.fill_(-0.5)  # `encode` keeps pre > max(threshold, 0)
    assert inference_threshold(sae) == 0.0
    assert inference_threshold(build_sae(SAEConfig(arch="topk", d_in=3, d_sae=4, k=1))) is None
