"""Schedules: lr warm-up/decay and λ / sparsity warm-up equal their closed forms, reach the
optimizer, are off by default, resume exactly, and are searchable in spaces."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from monoray.data import FeatureSplits, load_features
from monoray.errors import InputError
from monoray.runs.checkpoint import load_checkpoint
from monoray.sae import drop_unused
from monoray.sweep.space import load_space
from monoray.train import TrainConfig, train_sae
from monoray.train.schedule import Schedule, warm
from monoray.trials.sae import check_trial_config

REPO = Path(__file__).parents[1]
FAST = {"d_sae": 64, "k": 8, "batch_size": 64, "lr": 3e-3, "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> FeatureSplits:
    return load_features("digits")


def _cfg(**changes: Any) -> TrainConfig:
    return TrainConfig.from_dict(drop_unused({"arch": "batchtopk", "d_in": 54, **FAST, **changes}))


def _schedule(steps_per_epoch: int = 10, **changes: Any) -> Schedule:
    return Schedule.of(_cfg(lr=1.0, epochs=10, **changes), steps_per_epoch)  # 100 steps


def test_lr_schedules_equal_their_closed_forms() -> None:
    const = _schedule(lr_warm_up_steps=20)
    assert [const.lr_at(s) for s in (0, 9, 19, 50, 99)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    lin = _schedule(lr_scheduler_name="linear", lr_warm_up_steps=20, lr_end_factor=0.2)
    for s in (20, 47, 99):  # decay over steps 20..99 (80 steps), to 0.2 at the last
        assert lin.lr_at(s) == pytest.approx(1 - 0.8 * (s - 19) / 80, rel=1e-12)
    assert lin.lr_at(19) == 1.0 and lin.lr_at(99) == pytest.approx(0.2)
    cos = _schedule(lr_scheduler_name="cosine", lr_decay_steps=40, lr_end_factor=0.0)
    assert cos.lr_at(59) == 1.0  # the first 60 steps are not decayed
    for s in (60, 79, 99):
        p = (s - 59) / 40
        assert cos.lr_at(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)), abs=1e-15)
    assert cos.lr_at(99) == pytest.approx(0.0, abs=1e-15)


def test_coefficient_warm_up_is_linear_and_reaches_the_full_value() -> None:
    assert [warm(s, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0] and warm(7, 0) == 1.0
    sched = _schedule(mono_warm_up_steps=10, l1_warm_up_steps=4)
    from monoray.sae.base import SAELoss

    zero = torch.zeros(())
    loss = SAELoss(zero, zero + 2, zero, zero + 1, zero, sparsity_coef=0.5, mono_coef=0.1)
    scaled = sched.scale_loss(loss, 1)
    assert scaled.mono_coef == pytest.approx(0.1 * 0.2) and scaled.sparsity_coef == 0.25
    assert float(scaled.loss) == pytest.approx(2 * 0.25 + 0.02)


def test_off_by_default_and_validated() -> None:
    sched = Schedule.of(_cfg(), 23)
    assert not sched.lr_scheduled and not sched.coefs_scheduled
    assert all(sched.lr_at(s) == 3e-3 for s in (0, 100, 10**6))
    with pytest.raises(InputError, match="lr_scheduler_name must be one of constant"):
        _cfg(lr_scheduler_name="step")
    with pytest.raises(InputError, match="lr_decay_steps needs lr_scheduler_name"):
        _cfg(lr_decay_steps=10)
    with pytest.raises(InputError, match="lr_warm_up_steps must be >= 0"):
        _cfg(lr_warm_up_steps=-1)


def test_scheduled_run_resumes_bit_for_bit(digits: FeatureSplits, tmp_path: Path) -> None:
    # Every schedule on, each crossing an epoch boundary (23 steps per epoch).
    cfg = _cfg(
        arch="vanilla",
        mono_coef=3e-3,
        epochs=3,
        lr_scheduler_name="cosine",
        lr_warm_up_steps=30,
        lr_end_factor=0.05,
        mono_warm_up_steps=40,
        l1_warm_up_steps=50,
    )
    full = train_sae(cfg, digits, out_dir=tmp_path / "a", progress=False, keep_checkpoints=3)
    ref = load_checkpoint(tmp_path / "a")
    # The lr the optimizer used last is the closed form's value for the last step.
    last_lr = ref.optimizer_state["param_groups"][0]["lr"]
    assert last_lr == Schedule.of(cfg, 23).lr_at(3 * 23 - 1) == pytest.approx(3e-3 * 0.05)
    assert full != train_sae(_cfg(arch="vanilla", mono_coef=3e-3, epochs=3), digits,
                             out_dir=tmp_path / "plain", progress=False)  # fmt: skip

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, *_: Any) -> None:
        if epoch == 1:
            raise Stop  # an interruption right after epoch 1's checkpoint

    with pytest.raises(Stop):
        train_sae(cfg, digits, out_dir=tmp_path / "b", on_epoch=stop_after_first, progress=False)
    resumed = train_sae(cfg, digits, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed == full
    got = load_checkpoint(tmp_path / "b")
    for key, value in ref.model_state.items():
        assert torch.equal(got.model_state[key], value), key
    again = train_sae(
        cfg,
        digits,
        out_dir=tmp_path / "c",
        resume_from=tmp_path / "a" / "checkpoints" / "epoch-0002",
    )
    assert again == full
    # The decay is placed by the run's length: a resume may not change the epochs then.
    with pytest.raises(InputError, match="cannot resume: the checkpoint has epochs=3"):
        train_sae(cfg.replace(epochs=4), digits, out_dir=tmp_path / "b", resume=True)


def test_space_with_searched_schedule_options_builds(digits: FeatureSplits) -> None:
    space = load_space(
        REPO / "search_spaces" / "demo.yaml",
        [
            "search.lr_warm_up_steps={type: int, low: 0, high: 500}",
            "search.mono_warm_up_steps={type: int, low: 0, high: 1000}",
            "search.lr_scheduler_name={type: categorical, choices: [constant, cosine]}",
            "fixed.lr_end_factor=0.1",
            "baseline.params.lr_warm_up_steps=0",
            "baseline.params.mono_warm_up_steps=0",
            "baseline.params.lr_scheduler_name=constant",
        ],
    )
    assert {"lr_warm_up_steps", "mono_warm_up_steps"} <= {p.name for p in space.search}
    check_trial_config(space, digits)
    bad = load_space(
        REPO / "search_spaces" / "demo.yaml",
        [
            "search.lr_warm_up_steps={type: int, low: -5, high: 5}",
            "baseline.params.lr_warm_up_steps=0",
        ],
    )
    with pytest.raises(InputError, match="lr_warm_up_steps must be >= 0"):
        check_trial_config(bad, digits)
