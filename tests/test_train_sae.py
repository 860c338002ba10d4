"""The trainer on real data (scikit-learn's digits), no mocks: every architecture learns,
resume reproduces an uninterrupted run exactly, evaluation changes nothing."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monoray.data import FeatureSplits, load_features
from monoray.errors import InputError
from monoray.runs.checkpoint import load_checkpoint
from monoray.runs.outcome import DivergedError
from monoray.sae import TOPK_FAMILY, build_sae, drop_unused
from monoray.train import VAL_KEYS, TrainConfig, evaluate, train_sae

# Small and quick on 2 CPU cores: 8 epochs of 45 steps, a few seconds per architecture.
FAST = {
    "d_sae": 128,
    "k": 8,
    "epochs": 8,
    "batch_size": 32,
    "lr": 3e-3,
    "threshold_ema": 0.95,
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny GEMMs: OpenMP threads only fight over the 2 shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> FeatureSplits:
    return load_features("digits")


def _cfg(splits: FeatureSplits, **changes: Any) -> TrainConfig:
    flat = {"arch": "batchtopk", "d_in": splits.train.dim, **FAST, **changes}
    return TrainConfig.from_dict(drop_unused(flat))  # FAST's k is the TopK family's


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "vanilla", "matryoshka"])
def test_every_architecture_learns_digits(arch: str, digits: FeatureSplits, tmp_path: Path) -> None:
    cfg = _cfg(digits, arch=arch)
    metrics = train_sae(cfg, digits, out_dir=tmp_path, progress=False)
    assert metrics["r2"] > 0.5, metrics
    if arch in TOPK_FAMILY:
        assert abs(metrics["l0"] - cfg.sae.k) <= 0.1 * cfg.sae.k, metrics
    for key in VAL_KEYS:
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["purity_binary"] <= 1 and 0 <= metrics["dead_fraction"] < 1
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {k: written[k] for k in VAL_KEYS} == {k: metrics[k] for k in VAL_KEYS}
    assert (tmp_path / "monoscore_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "epoch-0008"


def test_resume_reproduces_the_uninterrupted_run(digits: FeatureSplits, tmp_path: Path) -> None:
    # MonoLoss on, BatchTopK's threshold buffer and AuxK's dead-latent counters in play.
    cfg = _cfg(digits, mono_coef=3e-3, epochs=3)
    seen: list[tuple[int, dict[str, Any], Path]] = []
    full = train_sae(
        cfg, digits, out_dir=tmp_path / "a", on_epoch=lambda *a: seen.append(a), progress=False
    )
    assert [e for e, _, _ in seen] == [1, 2, 3]
    _, metrics, ckpt_dir = seen[-1]
    assert ckpt_dir == tmp_path / "a" / "checkpoints" / "epoch-0003" and ckpt_dir.is_dir()
    assert metrics["epoch"] == 3.0 and "train_mono" in metrics and "monoscore_median" in metrics
    assert len(metrics["monoscore_profile"]) == cfg.sae.d_sae

    first = train_sae(cfg.replace(epochs=2), digits, out_dir=tmp_path / "b", progress=False)
    assert first != full
    resumed = train_sae(cfg, digits, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed == full  # exact equality on CPU
    ckpt = load_checkpoint(tmp_path / "b")
    assert ckpt.epoch == 3 and [h["epoch"] for h in ckpt.history] == [1.0, 2.0, 3.0]
    # Nothing left to do: resuming a finished run returns its metrics without training.
    assert train_sae(cfg, digits, out_dir=tmp_path / "b", resume=True, progress=False) == full
    # Resuming from a checkpoint directory (as Ray Tune restores one) works the same way.
    again = train_sae(
        cfg,
        digits,
        out_dir=tmp_path / "c",
        resume_from=tmp_path / "b" / "checkpoints" / "epoch-0002",
    )
    assert again == full
    with pytest.raises(InputError, match="cannot resume: the checkpoint has k=8, this run k=9"):
        train_sae(cfg.replace(k=9), digits, out_dir=tmp_path / "b", resume=True)


def test_checkpoint_from_before_recon_loss_resumes_on_plain_mse(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    # TopK trained on plain MSE before `recon_loss` existed; its default is normalised now.
    cfg = _cfg(digits, arch="topk", recon_loss="mse", epochs=2)
    full = train_sae(cfg, digits, out_dir=tmp_path / "a", progress=False)
    train_sae(cfg.replace(epochs=1), digits, out_dir=tmp_path / "b", progress=False)
    record = tmp_path / "b" / "checkpoints" / "epoch-0001" / "checkpoint.json"
    old = json.loads(record.read_text())
    del old["config"]["recon_loss"]
    record.write_text(json.dumps(old))
    default = _cfg(digits, arch="topk", epochs=2)
    with pytest.raises(InputError, match="recon_loss='mse', this run recon_loss='normalized_mse'"):
        train_sae(default, digits, out_dir=tmp_path / "b", resume=True, progress=False)
    assert train_sae(cfg, digits, out_dir=tmp_path / "b", resume=True, progress=False) == full


def test_matryoshka_with_explicit_prefixes_resumes(digits: FeatureSplits, tmp_path: Path) -> None:
    # Prefixes are a tuple in the config and a list in the checkpoint's JSON.
    cfg = _cfg(digits, arch="matryoshka", matryoshka_prefixes=[16, 64, 128], epochs=2)
    full = train_sae(cfg, digits, out_dir=tmp_path / "a", progress=False)
    train_sae(cfg.replace(epochs=1), digits, out_dir=tmp_path / "b", progress=False)
    assert train_sae(cfg, digits, out_dir=tmp_path / "b", resume=True, progress=False) == full


def test_checkpoint_round_trip_and_eval_changes_nothing(
    digits: FeatureSplits, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(digits, arch="topk", epochs=2)
    metrics = train_sae(cfg, digits, out_dir=tmp_path, progress=True)
    assert "90/90" in capsys.readouterr().err  # the progress bar, forced on
    ckpt = load_checkpoint(tmp_path)
    assert TrainConfig.from_dict(ckpt.config) == cfg
    assert ckpt.data["features"] == "digits"
    sae = build_sae(cfg.sae)
    sae.load_state_dict(ckpt.model_state)
    sae.train()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    rng = torch.get_rng_state()
    result = evaluate(sae, digits.val, batch_size=4096, device="cpu")
    assert {k: result.metrics[k] for k in VAL_KEYS} == {k: metrics[k] for k in VAL_KEYS}
    assert np.array_equal(result.monoscore, ckpt.eval_tensors["monoscore"].numpy())
    # Nothing changed: parameters, buffers (dead-latent counters), mode and the RNG.
    after = sae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sae.training and torch.equal(rng, torch.get_rng_state())
    # And the result does not depend on the evaluation batch size (up to float32 GEMM rounding).
    small = evaluate(sae, digits.val, batch_size=7, device="cpu", collect=[0, 5])
    for key in VAL_KEYS:
        assert small.metrics[key] == pytest.approx(result.metrics[key], rel=1e-5, abs=1e-9)
    dense = sae.encode(
        torch.nn.functional.normalize(torch.from_numpy(digits.val.features))
    ).to_dense()
    assert np.allclose(small.collected, dense[:, [0, 5]].numpy())


def test_divergence_raises_a_dedicated_error(digits: FeatureSplits, tmp_path: Path) -> None:
    cfg = _cfg(digits, arch="vanilla", lr=1e30, grad_clip=0.0, epochs=2)
    with pytest.raises(DivergedError, match=r"loss became NaN/inf at epoch 1, step \d+"):
        train_sae(cfg, digits, out_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path) is None  # the diverged epoch is never checkpointed


def test_config_flat_round_trip_and_errors() -> None:
    cfg = TrainConfig.from_dict(
        {"arch": "topk", "d_in": 54, "expansion": 4, "k": "16", "lr": "3e-4"}
    )
    assert cfg.sae.d_sae == 216 and cfg.sae.k == 16 and cfg.lr == 3e-4
    assert cfg.sae.seed == cfg.seed == 42
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.to_dict()) <= set(TrainConfig.allowed_keys())
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    for bad, message in [
        ({"arch": "topk", "d_in": 8, "lrr": 1}, "unknown config key 'lrr' (did you mean 'lr'?)"),
        ({"arch": "topk"}, "config needs d_in"),
        ({"arch": "topk", "d_in": 8, "d_sae": 16, "k": 32}, "k 32 is larger than d_sae 16"),
        ({"arch": "nope", "d_in": 8}, "arch must be one of"),
        ({"arch": "topk", "d_in": 8, "d_sae": 16, "expansion": 4}, "disagree"),
        ({"arch": "topk", "d_in": 8, "epochs": 0}, "epochs must be > 0"),
        ({"arch": "topk", "d_in": 8, "epochs": 1.5}, "epochs must be int"),
        ({"arch": "topk", "d_in": 8, "device": "tpu"}, "device must be"),
        ({"arch": "topk", "d_in": 8, "normalize": "l2"}, "normalize must be one of"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            TrainConfig.from_dict(bad)


def test_dimension_mismatch_is_an_input_error(digits: FeatureSplits, tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict({"arch": "topk", "d_in": 768, "d_sae": 32, "k": 4})
    with pytest.raises(InputError, match="digits: dim 54 does not match the config's d_in 768"):
        train_sae(cfg, digits, out_dir=tmp_path)


def test_a_sharded_float16_store_trains_like_the_same_data_in_memory(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    from monoray.data import FeatureSplit, FeatureStoreWriter, ShardedArray

    x = digits.train.features.astype(np.float16)
    for name, split in (("train", digits.train), ("val", digits.val)):
        with FeatureStoreWriter(
            tmp_path / "store" / name,
            encoder="digits-pixels",
            dim=54,
            has_labels=True,
            shard_rows=500,
        ) as w:
            w.append(split.features, split.ids, split.labels)
    store = load_features(tmp_path / "store")
    assert isinstance(store.train.features, ShardedArray)  # 3 memory-mapped shards
    in_memory = FeatureSplits(
        train=FeatureSplit(x.astype(np.float32), digits.train.labels, digits.train.ids),
        val=FeatureSplit(
            digits.val.features.astype(np.float16).astype(np.float32),
            digits.val.labels,
            digits.val.ids,
        ),
        header=store.header,
    )
    cfg = _cfg(digits, arch="topk", epochs=2)
    a = train_sae(cfg, store, out_dir=tmp_path / "a", progress=False)
    b = train_sae(cfg, in_memory, out_dir=tmp_path / "b", progress=False)
    assert a == b
