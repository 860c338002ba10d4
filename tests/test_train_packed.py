"""`train_pack`: P SAEs in one process, each member the run `train_sae` gives it alone.

Tolerance. A member that steps on its own (every architecture but TopK / BatchTopK,
or alone in its kernel group, or too large to stack) gets the pack's batched encoder
GEMM (`torch.baddbmm`), which on CPU gives the same bits as its own `addmm`; all else is
its own code on its own tensors, so on the sparse path (impl "auto" / "sparse" on CPU) it
must equal the run alone EXACTLY (parameters, Adam state, every metric).

Two kinds of member sum the same products in another order, so float32 rounding
(~1e-7 relative per op) separates them from the run alone:
- a member on the dense path (impl "dense", the CUDA default): the dense custom backward
  of the batched pre-activations instead of autograd's `F.linear` backward;
- a stacked member (`monoray.train.stacked`: TopK / BatchTopK members of one kernel
  group step as one): dense batched kernels in place of its sparse ones, and Adam on the
  stack in place of the fused kernel.
Adam divides by √v, so where a gradient is near 0 its update is a ratio of rounding
errors (up to lr per step) and a few such entries drift further than the rest. After 50
steps we allow `TOLERANCE` of each tensor's scale (measured at most 7e-5 on these
configs); integer state (dead-latent counters, threshold updates, steps) and the Adam
step count must be equal, and metrics agree to 1e-4 relative.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from monoray.data import FeatureSplits, load_features
from monoray.runs.checkpoint import CHECKPOINTS
from monoray.runs.outcome import DIVERGED_KEY, INPUT_ERROR_KEY, METRICS_FILE
from monoray.sae import TOPK_FAMILY
from monoray.train import TrainConfig, packed, train_sae
from monoray.train.packed import EpochEnd, MemberOutcome, train_pack

ROWS = 400
"""Digits rows per split: 400 train rows at batch 16 are 25 steps an epoch."""
BASE = {"d_sae": 64, "batch_size": 16, "epochs": 2, "device": "cpu", "eval_batch_size": 128}
TOLERANCE = 3e-4
"""Of a tensor's scale, for members not bit-identical to the run alone (module doc)."""


@pytest.fixture(scope="module")
def digits() -> FeatureSplits:
    return load_features("digits").head(ROWS)


def _cfg(splits: FeatureSplits, **over: Any) -> TrainConfig:
    return TrainConfig.from_dict({"d_in": splits.train.dim, **BASE, **over})


def _state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Model and optimizer tensors and the record of the newest checkpoint in `out_dir`."""
    root = out_dir / CHECKPOINTS
    ckpt = root / (root / "latest").read_text().strip()
    record = json.loads((ckpt / "checkpoint.json").read_text())
    return (
        load_file(ckpt / "model.safetensors"),
        load_file(ckpt / "optimizer.safetensors"),
        record,
    )


def _assert_same_run(packed: Path, alone: Path, *, exact: bool = True) -> None:
    (pm, po, prec), (am, ao, arec) = _state(packed), _state(alone)
    assert prec["epoch"] == arec["epoch"] and prec["step"] == arec["step"]
    assert pm.keys() == am.keys() and po.keys() == ao.keys()
    if exact:
        assert all(torch.equal(pm[k], am[k]) for k in am)
        assert all(torch.equal(po[k], ao[k]) for k in ao)
        assert prec["history"] == arec["history"]
        assert json.loads((packed / METRICS_FILE).read_text()) == json.loads(
            (alone / METRICS_FILE).read_text()
        )
        return
    for name, p, a in [(k, pm[k], am[k]) for k in am] + [(k, po[k], ao[k]) for k in ao]:
        if not a.is_floating_point() or name.endswith(".step"):
            assert torch.equal(p, a), name
            continue
        scale = a.abs().max().clamp_min(1e-12)
        assert (p - a).abs().max() <= TOLERANCE * scale, name
    for p_epoch, a_epoch in zip(prec["history"], arec["history"], strict=True):
        assert p_epoch == pytest.approx(a_epoch, rel=1e-4, abs=1e-6)


def _alone(cfgs: list[TrainConfig], splits: FeatureSplits, root: Path) -> list[dict]:
    return [
        train_sae(cfg, splits, out_dir=root / f"alone{i}", progress=False)
        for i, cfg in enumerate(cfgs)
    ]


def _pack(cfgs: list[TrainConfig], splits: FeatureSplits, root: Path, **kw: Any) -> list:
    dirs = [root / f"packed{i}" for i in range(len(cfgs))]
    return train_pack(cfgs, splits, out_dirs=dirs, progress=False, **kw)


def _stacked_pack(
    cfgs: list[TrainConfig], splits: FeatureSplits, root: Path, **kw: Any
) -> tuple[list, set[Path]]:
    """`_pack`, and the out dirs of the members that stepped in a `Stack`."""
    stacked: set[Path] = set()

    class Recording(packed.Stack):
        def __init__(self, runs: list) -> None:
            stacked.update(r.out_dir for r in runs)
            super().__init__(runs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packed, "Stack", Recording)
        return _pack(cfgs, splits, root, **kw), stacked


def _assert_outcome_close(out: MemberOutcome, ref: dict, *, exact: bool) -> None:
    assert out.metrics is not None and out.failure is None
    if exact:
        assert out.metrics == ref
    else:
        assert out.metrics == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.timeout(900)
def test_pack_of_four_equals_each_member_alone_after_50_steps(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    """Different λ, lr and k in one kernel group: one stack, each member within `TOLERANCE`
    of its run alone."""
    cfgs = [
        _cfg(digits, arch="batchtopk", k=8, mono_coef=0.0, lr=3e-3),
        _cfg(digits, arch="batchtopk", k=4, mono_coef=0.03, lr=1e-3),
        _cfg(digits, arch="batchtopk", k=16, mono_coef=0.1, lr=5e-3),
        _cfg(digits, arch="batchtopk", k=8, mono_coef=0.3, lr=2e-3, aux_coef=0.0),
    ]
    outcomes, stacked = _stacked_pack(cfgs, digits, tmp_path)
    assert stacked == {tmp_path / f"packed{i}" for i in range(4)}
    alone = _alone(cfgs, digits, tmp_path)
    for i, (out, ref) in enumerate(zip(outcomes, alone, strict=True)):
        _assert_outcome_close(out, ref, exact=False)
        assert ref["step"] == 50.0
        _assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}", exact=False)
    # The members really differ (the test would not see a pack that trained one model).
    assert len({o.metrics["r2"] for o in outcomes if o.metrics}) == 4


@pytest.mark.timeout(900)
def test_a_stack_runs_every_term_of_its_members_steps(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    """TopK and BatchTopK in one stack with AuxK on many dead latents, TopK re-initialising
    dead latents, both reconstruction losses, an lr warm-up, float64 MonoLoss products and
    grad clipping off: each within `TOLERANCE` of alone. A member whose λ is scheduled
    steps on its own and stays exact."""
    dead = {"dead_steps_threshold": 3}
    cfgs = [
        _cfg(digits, arch="topk", k=8, lr=4e-3, mono_coef=0.1, dead_reinit_steps=20, **dead),
        _cfg(digits, arch="batchtopk", k=4, lr=3e-3, mono_coef=0.3, aux_k=16, **dead),
        _cfg(digits, arch="topk", k=4, lr=2e-3, recon_loss="mse", lr_warm_up_steps=20),
        _cfg(digits, arch="batchtopk", k=8, lr=3e-3, recon_loss="normalized_mse", grad_clip=0.0),
        _cfg(digits, arch="batchtopk", k=8, lr=3e-3, mono_coef=0.1, mono_warm_up_steps=30),
    ]
    precise = [_cfg(digits, arch="topk", k=8, lr=2e-3, mono_coef=0.1, mono_precision="float64")]
    outcomes, stacked = _stacked_pack([*cfgs, *precise, *precise], digits, tmp_path)
    assert stacked == {tmp_path / f"packed{i}" for i in (0, 1, 2, 3, 5, 6)}
    alone = _alone([*cfgs, *precise], digits, tmp_path)
    for i, ref in enumerate(alone):
        exact = i == 4
        _assert_outcome_close(outcomes[i], ref, exact=exact)
        _assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}", exact=exact)
    assert outcomes[1].metrics is not None and outcomes[1].metrics["train_aux"] > 0


member = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(["batchtopk", "topk", "matryoshka", "jumprelu", "vanilla"]),
        "d_sae": st.sampled_from([32, 64]),
        "k": st.sampled_from([2, 8]),
        "mono_coef": st.sampled_from([0.0, 0.05]),
        "lr": st.sampled_from([1e-3, 4e-3]),
        "seed": st.sampled_from([0, 1]),
        "batch_size": st.sampled_from([32, 64]),
    }
).map(lambda m: m if m["arch"] in TOPK_FAMILY else {k: v for k, v in m.items() if k != "k"})


@pytest.mark.timeout(1200)
@settings(max_examples=4, deadline=None)
@given(mix=st.lists(member, min_size=2, max_size=4))
def test_any_member_mix_equals_each_member_alone(mix: list[dict], tmp_path_factory: Any) -> None:
    splits = load_features("digits").head(128)
    root = tmp_path_factory.mktemp("mix")
    cfgs = [_cfg(splits, epochs=1, **m) for m in mix]
    outcomes, stacked = _stacked_pack(cfgs, splits, root)
    alone = _alone(cfgs, splits, root)
    for i, (cfg, out, ref) in enumerate(zip(cfgs, outcomes, alone, strict=True)):
        exact = cfg.sae.impl != "dense" and root / f"packed{i}" not in stacked
        _assert_outcome_close(out, ref, exact=exact)
        _assert_same_run(root / f"packed{i}", root / f"alone{i}", exact=exact)


@pytest.mark.timeout(900)
def test_a_diverging_member_fails_alone_and_the_others_equal_alone(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    """lr 1e30 blows one member up in epoch 1; it is FAILED with its reason, the rest finish
    within `TOLERANCE` of alone; a member given the wrong width fails alone as bad input."""
    good = [
        _cfg(digits, arch="batchtopk", k=8, lr=3e-3, mono_coef=0.1),
        _cfg(digits, arch="topk", k=8, lr=1e-3, mono_coef=0.1),
    ]
    bad = _cfg(digits, arch="batchtopk", k=8, mono_coef=0.1, lr=1e30, grad_clip=0.0)
    wrong_width = TrainConfig.from_dict({**BASE, "arch": "topk", "d_in": 3})
    outcomes, stacked = _stacked_pack([good[0], bad, good[1], wrong_width], digits, tmp_path)
    assert stacked == {tmp_path / f"packed{i}" for i in range(3)}  # the NaNs stay in theirs
    diverged, mismatch = outcomes[1].failure, outcomes[3].failure
    assert diverged is not None and diverged[DIVERGED_KEY] == 1
    assert "became NaN/inf at epoch 1" in diverged["diverged_reason"]
    assert outcomes[1].metrics is None and not (tmp_path / "packed1" / CHECKPOINTS).exists()
    assert mismatch is not None and "3" in mismatch[INPUT_ERROR_KEY]
    _alone(good, digits, tmp_path)
    for i, j in ((0, 0), (2, 1)):
        assert outcomes[i].metrics is not None
        _assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{j}", exact=False)


@pytest.mark.timeout(900)
def test_on_epoch_stops_one_member_and_resume_skips_finished_ones(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    cfgs = [
        _cfg(digits, arch="batchtopk", k=8, lr=3e-3),
        _cfg(digits, arch="batchtopk", k=4, lr=3e-3, mono_coef=0.05),
    ]
    calls: list[tuple[int, list[int]]] = []

    def stop_first(epoch: int, ends: list[EpochEnd]) -> set[int]:
        for end in ends:  # called once a pack epoch, every member's checkpoint written
            assert (end.checkpoint / "checkpoint.json").exists()
            assert "monoscore_profile" in end.metrics and end.metrics["epoch"] == epoch
        calls.append((epoch, [e.member for e in ends]))
        return {0}

    outcomes = _pack(cfgs, digits, tmp_path, on_epoch=stop_first)
    assert outcomes[0] == MemberOutcome(stopped_epoch=1)
    assert not (tmp_path / "packed0" / METRICS_FILE).exists()
    assert outcomes[1].metrics is not None
    assert calls == [(1, [0, 1]), (2, [1])]  # member 0 is gone after epoch 1
    calls.clear()
    again = train_pack(
        cfgs[1:], digits, out_dirs=[tmp_path / "packed1"], resume=True, on_epoch=stop_first
    )
    assert again == [outcomes[1]] and calls == []  # finished: not retrained


CHILD = """
import sys
from pathlib import Path
from monoray.data import load_features
from monoray.train import TrainConfig
from monoray.train.packed import train_pack
from monoray.train.trainer import Run

cfgs = [TrainConfig.from_dict(c) for c in {cfgs!r}]
dirs = [Path({root!r}) / f"m{{i}}" for i in range(len(cfgs))]
block_member, block_epoch, block_step = {block!r}


def block(where):
    print(where, flush=True)
    sys.stdin.readline()  # the parent SIGKILLs us here


if block_step is not None:
    step = Run.train_step
    def train_step(self, *args, **kw):
        if self.out_dir == dirs[block_member] and self.step == block_step:
            block("step")
        return step(self, *args, **kw)
    Run.train_step = train_step

end_epoch = Run.end_epoch
def before_checkpoint(self, epoch, *args, **kw):
    if (self.out_dir, epoch) == (dirs[block_member], block_epoch):
        block("epoch")
    return end_epoch(self, epoch, *args, **kw)
Run.end_epoch = before_checkpoint

train_pack(cfgs, load_features("digits").head({rows}), out_dirs=dirs, resume={resume},
           progress=False)
print("done", flush=True)
"""


def _child(cfgs: list[TrainConfig], root: Path, block: tuple, *, resume: bool) -> str:
    """Run train_pack in a subprocess; SIGKILL it where it blocks. Returns what it printed."""
    code = CHILD.format(
        cfgs=[c.to_dict() for c in cfgs], root=str(root), block=block, rows=ROWS, resume=resume
    )
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        proc.kill()
        proc.wait()
    return line


@pytest.mark.timeout(1200)
def test_a_pack_killed_mid_epoch_resumes_every_member_like_an_uninterrupted_pack(
    digits: FeatureSplits, tmp_path: Path
) -> None:
    """Kill 1 lands between members' checkpoints of epoch 2 (before member 2's: members 0-1
    at epoch 2, 2-3 at epoch 1);
    kill 2 lands mid-epoch 3 in a resumed pack; the third run finishes. Every member then
    equals the uninterrupted pack's bit for bit."""
    cfgs = [
        _cfg(digits, arch="batchtopk", k=8, lr=3e-3, mono_coef=0.05, epochs=3),
        _cfg(digits, arch="topk", k=4, lr=2e-3, epochs=3),
        _cfg(digits, arch="batchtopk", k=8, lr=3e-3, seed=5, epochs=3),
        _cfg(digits, arch="vanilla", d_sae=32, lr=2e-3, epochs=3),
    ]
    killed = tmp_path / "killed"
    assert _child(cfgs, killed, (2, 2, None), resume=False) == "epoch"
    epochs = [_state(killed / f"m{i}")[2]["epoch"] for i in range(4)]
    assert epochs == [2, 2, 1, 1]
    steps = 25  # per epoch: 400 rows at batch 16
    assert _child(cfgs, killed, (3, None, 2 * steps + 7), resume=True) == "step"
    epochs = [_state(killed / f"m{i}")[2]["epoch"] for i in range(4)]
    assert epochs == [2, 2, 2, 2]
    outcomes = train_pack(
        cfgs, digits, out_dirs=[killed / f"m{i}" for i in range(4)], resume=True, progress=False
    )
    reference = _pack(cfgs, digits, tmp_path)
    assert outcomes == reference
    for i in range(4):
        _assert_same_run(killed / f"m{i}", tmp_path / f"packed{i}")


@pytest.mark.timeout(600)
def test_a_pack_reads_each_batch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One data group: one train gather per step and one val pass per epoch for all members;
    a second seed is a second data group with its own gathers."""
    from monoray.train import packed

    splits = load_features("digits").head(256)
    gathers, val_reads = [], []
    real_get, real_val = packed._Batches.get, packed.val_batch
    monkeypatch.setattr(
        packed._Batches, "get", lambda self, idx: gathers.append(1) or real_get(self, idx)
    )
    monkeypatch.setattr(packed, "val_batch", lambda *a: val_reads.append(1) or real_val(*a))
    base = {"epochs": 1, "batch_size": 64, "eval_batch_size": 128}
    cfgs = [
        _cfg(splits, arch="batchtopk", k=8, lr=1e-3, **base),
        _cfg(splits, arch="topk", k=4, lr=2e-3, mono_coef=0.1, **base),
        _cfg(splits, arch="vanilla", d_sae=32, lr=3e-3, **base),
    ]
    assert all(o.metrics for o in _pack(cfgs, splits, tmp_path))
    assert (len(gathers), len(val_reads)) == (256 // 64, 256 // 128)
    gathers.clear()
    _pack([*cfgs, _cfg(splits, arch="batchtopk", seed=3, **base)], splits, tmp_path / "two")
    assert len(gathers) == 2 * 256 // 64
