"""Encoder registry, weights resolution and the split preprocessing of `monoray extract`."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from monoray.errors import InputError
from monoray.extract.encoders import (
    ENCODERS,
    Encoder,
    EncoderSpec,
    build_tower,
    describe_encoder,
    resolve_precision,
)

SMALL = EncoderSpec("clip-vit-b32", "random-init", image_size=32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_registered_encoder_describes_offline(name):
    info = describe_encoder(EncoderSpec(name, "random-init"))
    assert info.dim >= 192 and info.weights_file is None
    assert info.weights_id == "random-init seed=0"
    pre = info.preprocess
    out = pre(Image.new("RGB", (300, 170), (255, 0, 0)))
    assert out.shape == (*pre.size, 3) and out.dtype == np.uint8
    pickle.loads(pickle.dumps(pre))  # travels to loader workers and Ray tasks


def test_preprocessing_follows_the_pretrained_tag():
    siglip = describe_encoder(EncoderSpec("siglip2-vit-b16", "random-init")).preprocess
    clip = describe_encoder(EncoderSpec("clip-vit-b32", "random-init")).preprocess
    assert siglip.mean == (0.5, 0.5, 0.5)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert describe_encoder(SMALL).preprocess.size == (32, 32)


def test_device_preprocessing_equals_the_models_own_transform():
    """uint8 -> [0,1] -> Normalize on the batch is bit-identical to ToTensor + Normalize."""
    enc = Encoder(SMALL)
    _, transform = build_tower(enc.info.entry, None, 32, "cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = np.stack([enc.info.preprocess(im) for im in images])
    ours = enc.encode(pixels)
    with torch.inference_mode():
        ref = enc.model(torch.stack([transform(im) for im in images])).float()
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.float32 and enc.calls == 1
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_unknown_encoder_and_bad_options():
    with pytest.raises(InputError, match="unknown encoder 'nope'"):
        describe_encoder(EncoderSpec("nope", "random-init"))
    with pytest.raises(InputError, match="--normalize must be one of unit, none"):
        describe_encoder(EncoderSpec("clip-vit-b32", "random-init", normalize="l1"))
    with pytest.raises(InputError, match="--precision"):
        resolve_precision("int8", "cpu")
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("auto", "cuda") == "float16"


def test_missing_weight_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"missing.safetensors: weight file not found") as err:
        describe_encoder(EncoderSpec("clip-vit-b32", str(tmp_path / "missing.safetensors")))
    assert "\n" not in str(err.value)


def test_cache_lookup_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        describe_encoder(EncoderSpec("vit-l16", "cache"))


def test_cache_lookup_finds_a_cached_file(tmp_path, monkeypatch):
    snap = tmp_path / "models--timm--vit_base_patch14_dinov2.lvd142m" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    info = describe_encoder(EncoderSpec("dinov2-vit-b14", "cache"))
    assert info.weights_file == snap / "model.safetensors"
    assert info.weights_id.startswith("sha256:") and info.weights_id.endswith("model.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_weights_are_loaded_safely(tmp_path):
    """A pickled object with code in a .pt file is refused (weights_only), as one line."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(InputError, match=r"evil.pt: cannot load weights for clip-vit-b32"):
        Encoder(EncoderSpec("clip-vit-b32", str(path), image_size=32))
