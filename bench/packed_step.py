"""Packed SAE step at the paper's size: time per member with P members vs one SAE alone.

    python bench/packed_step.py               # BatchTopK, batch 2048, d 768, 8192 latents, k 64; P = 1, 4
    python bench/packed_step.py --packs 1 4 8 16 --device cuda
    python bench/packed_step.py --quick       # small sizes, seconds (smoke test)

A packed step is what `train_pack` does per batch (`monoray.train.packed.Pack.step`):
one batch normalised once, then either one `Stack` step for all P members (on
the dense path, `--device cuda`, or on CPU when batch * d_sae * d_in <= 2^21;
`monoray.train.stacked`), or, at this size on CPU, each member's own step (sparse
path, MonoLoss at λ > 0, backward, clip, fused Adam, renorm). P = 1 is exactly
`train_sae`'s step. The members
differ in lr and λ (as a sweep's do), all at k 64. Pack sizes run interleaved
(one step of each per round) so background load hits them alike; each is
reported as ms per step (median, min) and ms per member step, and the ratio
per member to P = 1 from the fastest steps (other jobs only ever add time on a
shared box) and from the medians. Throughput: member steps per second, and
trials per hour for a trial of `--trial-steps` steps (the step alone: no
evaluation, checkpoints or tracking). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine

from monoray.data import FeatureSplit, FeatureSplits
from monoray.data.types import StoreHeader
from monoray.train import TrainConfig
from monoray.train.packed import Pack

PAPER = {"batch": 2048, "d_in": 768, "d_sae": 8192, "k": 64}
QUICK = {"batch": 256, "d_in": 64, "d_sae": 1024, "k": 8}
TARGET_PER_MEMBER_RATIO_MAX = 1.0
"""Packed must be no slower per member than one SAE alone (issue 14)."""


def synthetic_splits(rows: int, d_in: int) -> FeatureSplits:
    """Unit-norm Gaussian features (the step's cost does not depend on their values)."""
    gen = np.random.default_rng(0)
    x = gen.standard_normal((rows, d_in), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    split = FeatureSplit(features=x, labels=None, ids=np.arange(rows))
    return FeatureSplits(train=split, val=split, header=StoreHeader(encoder="synthetic", dim=d_in))


def member_configs(p: int, shape: dict[str, int], device: str) -> list[TrainConfig]:
    """P BatchTopK members as a sweep proposes them: lr and λ differ, the shapes agree."""
    return [
        TrainConfig.from_dict(
            {
                "arch": "batchtopk",
                "d_in": shape["d_in"],
                "d_sae": shape["d_sae"],
                "k": shape["k"],
                "mono_coef": 3e-4 * (1 + i),
                "lr": 1e-4 * (1 + 0.5 * i),
                "batch_size": shape["batch"],
                "device": device,
            }
        )
        for i in range(p)
    ]


def packed_step_report(
    packs: list[int],
    shape: dict[str, int],
    device: str = "auto",
    reps: int = 5,
    warmup: int = 1,
    trial_steps: int = 1000,
) -> dict[str, Any]:
    """Time one packed step for each pack size in `packs` (see the module doc)."""
    splits = synthetic_splits(shape["batch"], shape["d_in"])
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for p in packs:
            cfgs = member_configs(p, shape, device)
            dirs = [Path(tmp) / f"p{p}-{i}" for i in range(p)]
            pack = Pack.open(cfgs, splits, dirs, resume=False)
            runs[p] = (pack, pack.begin_epoch(pack.live, 1))
        dev = runs[packs[0]][0].live[0].run.device
        x_raw = torch.from_numpy(splits.train.features).to(dev)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def one(p: int) -> float:
            pack, epoch = runs[p]
            sync()
            t0 = time.perf_counter()
            pack.step(epoch, x_raw)
            sync()
            assert len(pack.live) == p, "a member failed in the benchmark"
            return (time.perf_counter() - t0) * 1e3

        for _ in range(warmup):
            for p in packs:
                one(p)
        times: dict[int, list[float]] = {p: [] for p in packs}
        for r in range(reps):
            for p in packs[r % len(packs) :] + packs[: r % len(packs)]:
                times[p].append(one(p))
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    base_min, base_med = (
        min(times[packs[0]]) / packs[0],
        statistics.median(times[packs[0]]) / packs[0],
    )
    results = {}
    for p, ts in times.items():
        per_min, per_med = min(ts) / p, statistics.median(ts) / p
        results[str(p)] = {
            "ms_per_step": {"median": round(statistics.median(ts), 2), "min": round(min(ts), 2)},
            "ms_per_member_step": {"median": round(per_med, 2), "min": round(per_min, 2)},
            "per_member_ratio_vs_first": round(per_min / base_min, 3),
            "per_member_ratio_vs_first_of_medians": round(per_med / base_med, 3),
            "member_steps_per_s": round(1e3 / per_min, 2),
            "trials_per_hour": round(3600e3 / (per_min * trial_steps), 1),
        }
    return {
        "shape": shape,
        "device": str(dev),
        "packs": packs,
        "reps": reps,
        "warmup": warmup,
        "trial_steps": trial_steps,
        "cuda_peak_memory_gib": None if peak is None else round(peak / 2**30, 2),
        "results": results,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packs", type=int, nargs="+", default=[1, 4], help="pack sizes P")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per pack size")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per pack size")
    p.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cpu", "cuda"')
    p.add_argument("--trial-steps", type=int, default=1000, help="steps of a nominal trial")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape = dict(QUICK if args.quick else PAPER)
    reps = args.reps or (3 if args.quick else 5)
    t0 = time.perf_counter()
    report = {
        "bench": "packed_step",
        "quick": args.quick,
        "machine": machine(),
        "target_per_member_ratio_max": TARGET_PER_MEMBER_RATIO_MAX,
        **packed_step_report(
            sorted(set(args.packs)), shape, args.device, reps, args.warmup, args.trial_steps
        ),
    }
    worst = max(r["per_member_ratio_vs_first"] for r in report["results"].values())
    report["meets_target"] = worst <= TARGET_PER_MEMBER_RATIO_MAX
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
