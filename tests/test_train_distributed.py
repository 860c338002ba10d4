"""One SAE trained by W gloo ranks equals the single-process run (monoray.train.distributed).

Each world size is one spawn of W real gloo ranks that runs every case; the
parent compares rank 0's checkpoints and every rank's final metrics with
`train_sae` in this process at the same global batch and seed.

Tolerance: the ranks sum W partial sums (loss shares, gradients, metric
accumulators) where one process sums once, so float32 results differ by
rounding (~1e-7 relative per step; one step's loss and gradients: STEP_RTOL).
Adam divides by sqrt(v) + eps, so it amplifies rounding in coordinates with
tiny gradients: adam_eps 1e-6 here keeps 2 epochs within 1e-5 (measured up
to 4e-6 for the TopK family, whose selections are exact). JumpReLU and
vanilla get more room: their gradients are discontinuous in the
pre-activation (JumpReLU's z > θ and window |z - θ| < ε/2, ReLU's z > 0), and
the encoder GEMM on a slice of the batch rounds a row differently than on the
whole batch, so an entry that lands on the other side of an edge changes its
gradient by O(1) (measured: 3e-5 JumpReLU, 1.3e-5 vanilla at W = 3). MonoLoss runs in float64 on both sides here (mono_precision:
float64), so its value and gradient agree to MONO_RTOL.
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monoray.data import load_features
from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint
from monoray.sae import SAEConfig, build_sae, drop_unused
from monoray.sae.collective import Collective, Ranks
from monoray.sae.sparse import batch_topk
from monoray.train import TrainConfig, train_sae

pytestmark = pytest.mark.timeout(600)

ARCHS = ("batchtopk", "topk", "jumprelu", "vanilla", "matryoshka")
PARAM_ATOL = {"jumprelu": 1e-4, "vanilla": 5e-5}
"""Max |param - single-process param| after 2 epochs; 1e-5 for the other architectures."""
METRIC_RTOL = {"jumprelu": 1e-3, "vanilla": 1e-3}
"""Relative tolerance of the final metrics; 1e-4 for the other architectures."""
MONO_RTOL = 1e-6
STEP_RTOL = 1e-5
TIMEOUT_S = 120
TRAIN_ROWS = 717
"""11 batches of 60 and a last one of 57: unequal slices (29 + 28 at W = 2, 19 x 3 at W = 3)."""


def _cfg(arch: str) -> TrainConfig:
    return TrainConfig.from_dict(
        drop_unused(
            {
                "arch": arch,
                "d_in": 54,
                "d_sae": 32,
                "k": 4,
                "aux_k": 8,
                "dead_steps_threshold": 3,
                "dead_reinit_steps": 5,
                "mono_coef": 0.1,
                "mono_precision": "float64",
                "epochs": 2,
                "batch_size": 60,
                "lr": 3e-3,
                "adam_eps": 1e-6,  # see PARAM_ATOL
                "device": "cpu",
                "seed": 3,
            }
        )  # the dead-latent keys are the TopK family's
    )


def _ties_case(rank: int, world: int) -> dict[str, Any]:
    """BatchTopK selection over a global batch with exact ties at the cut, split by rank."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randint(0, 4, (12, 10), generator=gen).float()  # many equal values
    out = {}
    for n_keep in (7, 30, 61, 120):
        _, flat = batch_topk(acts, n_keep)
        rows = torch.tensor_split(torch.arange(12), world)[rank]
        ranks = Ranks()
        ranks.begin_batch(len(rows))
        _, f, smallest = ranks.batch_topk(acts[rows], n_keep)
        glob = f + int(rows[0]) * acts.shape[1] if len(rows) else f
        keep = torch.zeros(acts.numel(), dtype=torch.bool)
        keep[glob] = True
        every = torch.zeros_like(keep, dtype=torch.int32)
        every[glob] = 1
        dist.all_reduce(every)
        ref = torch.zeros_like(keep)
        ref[flat] = True
        out[str(n_keep)] = bool(torch.equal(every.bool(), ref)) and torch.equal(
            smallest, Collective().batch_topk(acts, n_keep)[2]
        )
    return out


def _all_dead(sae: Any) -> Any:
    if hasattr(sae, "steps_since_fired"):
        sae.steps_since_fired.fill_(1)
    return sae


def _step_case(rank: int, world: int, arch: str, mono_coef: float) -> dict[str, float]:
    """One training step's loss and gradients on a sharded batch vs the whole batch."""
    cfg = SAEConfig(
        arch=arch,
        d_in=16,
        d_sae=24,
        k=3,
        mono_coef=mono_coef,
        mono_precision="float64",
        dead_steps_threshold=1,  # AuxK on from the first step
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 16, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    ref = _all_dead(build_sae(cfg))
    ref_out = ref.forward_train(x)
    ref_out.loss.loss.backward()
    sae = _all_dead(build_sae(cfg))
    sae.collective = Ranks()
    rows = torch.tensor_split(torch.arange(30), world)[rank]
    out = sae.forward_train(x[rows])
    out.loss.loss.backward()
    sae.collective.sum_grads(sae.parameters())
    report = {}
    for key, value in out.loss.metrics().items():
        total = float(sae.collective.all_reduce(value))
        want = float(ref_out.loss.metrics()[key])
        report[key] = abs(total - want) / max(abs(want), 1e-12)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        scale = q.grad.abs().max().clamp_min(1e-30)
        report[f"grad_{name}"] = float((p.grad - q.grad).abs().max() / scale)
    return report


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        splits = load_features("digits").head(TRAIN_ROWS)
        report: dict[str, Any] = {"ties": _ties_case(rank, world)}
        report["mono"] = _step_case(rank, world, "batchtopk", 1.0)
        for arch in ARCHS:
            report[f"step_{arch}"] = _step_case(rank, world, arch, 0.1)
        for arch in ARCHS:
            report[arch] = train_sae(
                _cfg(arch), splits, out_dir=Path(out) / arch, progress=False, collective=Ranks()
            )
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    splits = load_features("digits").head(TRAIN_ROWS)
    for arch in ARCHS:
        train_sae(_cfg(arch), splits, out_dir=out / arch, progress=False)
    return out


def _spawn(world: int, out: Path) -> list[dict[str, Any]]:
    init = tempfile.mktemp(prefix="monoray-gloo-")
    mp.start_processes(_rank_main, args=(world, init, str(out)), nprocs=world, start_method="spawn")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def _close(a: float | None, b: float | None, rtol: float) -> bool:
    if a is None or b is None or a != a or b != b:
        return (a is None or a != a) and (b is None or b != b)
    return abs(a - b) <= rtol * max(abs(b), 1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_single_process(world: int, single: Path, tmp_path: Path) -> None:
    reports = _spawn(world, tmp_path)
    for report in reports:
        assert all(report["ties"].values()), report["ties"]
        assert report["mono"]["mono"] <= MONO_RTOL, report["mono"]
        assert max(v for k, v in report["mono"].items() if k.startswith("grad_")) <= MONO_RTOL
        for arch in ARCHS:
            assert max(report[f"step_{arch}"].values()) <= STEP_RTOL, report[f"step_{arch}"]
    for arch in ARCHS:
        ref = load_checkpoint(single / arch / CHECKPOINTS)
        got = load_checkpoint(tmp_path / arch / CHECKPOINTS)
        assert ref is not None and got is not None
        assert (got.epoch, got.step) == (ref.epoch, ref.step)
        assert got.model_state.keys() == ref.model_state.keys()
        for key, want in ref.model_state.items():
            have = got.model_state[key]
            if want.is_floating_point():
                diff = float((have - want).abs().max())
                assert diff <= PARAM_ATOL.get(arch, 1e-5), (arch, key, diff)
            else:
                assert torch.equal(have, want), (arch, key)
        for key, want in ref.history[-1].items():
            for r, report in enumerate(reports):
                rtol = METRIC_RTOL.get(arch, 1e-4)
                assert _close(report[arch][key], want, rtol), (
                    arch,
                    key,
                    r,
                    report[arch][key],
                    want,
                )


def test_batch_topk_keeps_the_lowest_positions_among_ties() -> None:
    acts = torch.tensor([[1.0, 2.0, 2.0, 0.0], [2.0, 2.0, 3.0, 2.0]])
    values, flat = batch_topk(acts, 4)
    assert flat.tolist() == [1, 2, 4, 6] and values.tolist() == [2.0, 2.0, 2.0, 3.0]
    _, flat = batch_topk(torch.ones(64, 100), 300)  # the sampled-cut path, all tied
    assert torch.equal(flat, torch.arange(300))
