"""How many packed SAE trials fit one GPU: measured on a real packed step, not estimated.

`monoray sweep --dry-run` trains one epoch over two batches of the space's
heaviest extreme point (largest `d_sae x (d_in + batch_size)`) as a pack of 1
and of 2, reads `torch.cuda.max_memory_allocated` for each, and extrapolates
linearly: peak(P) = base + P x per_member. The memory a pack may use is the
device's free memory, or its `resources.gpu` share of the total when packs
share a device (fractional `gpu`), less `HEADROOM` for the allocator's
fragmentation and CUDA's own context.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monoray.data import FeatureSplits
from monoray.errors import InputError
from monoray.sweep.space import SweepSpace, extreme_points

HEADROOM = 0.9
"""Fraction of the available GPU memory a pack is sized to."""
MEASURE_BATCHES = 2


@dataclass(frozen=True, slots=True)
class PackFit:
    largest: int
    """Largest pack that fits the memory available to one pack (0: not even one member)."""
    per_member_bytes: int
    base_bytes: int
    available_bytes: int
    point: dict[str, Any]
    """The trial parameters sized (the space's heaviest extreme point)."""

    def detail(self) -> str:
        mib = 2**20
        return (
            f"at most {self.largest} members fit this GPU ({self.per_member_bytes / mib:.0f} MiB "
            f"each + {self.base_bytes / mib:.0f} MiB of {self.available_bytes / mib:.0f} MiB "
            f"available, measured at {self.point})"
        )


def heaviest_point(space: SweepSpace, d_in: int) -> dict[str, Any]:
    def weight(params: dict[str, Any]) -> int:
        return int(params.get("d_sae", 0)) * (d_in + int(params.get("batch_size", 0)))

    points = [{**space.fixed, **p} for p in extreme_points(space)] or [dict(space.fixed)]
    return max(points, key=weight)


def measure_pack_fit(space: SweepSpace, splits: FeatureSplits) -> PackFit:
    """Peak GPU memory of a real packed epoch at P = 1 and 2, extrapolated to the largest P."""
    import torch

    from monoray.train import TrainConfig
    from monoray.train.packed import train_pack

    point = heaviest_point(space, splits.train.dim)
    cfg = TrainConfig.from_dict({**point, "d_in": splits.train.dim, "epochs": 1, "device": "cuda"})
    sample = splits.head(cfg.batch_size * MEASURE_BATCHES)
    peaks = []
    for pack in (1, 2):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory(prefix="monoray-packfit-") as tmp:
            out_dirs = [Path(tmp) / str(i) for i in range(pack)]
            train_pack([cfg] * pack, sample, out_dirs=out_dirs, progress=False)
        peaks.append(torch.cuda.max_memory_allocated())
    per_member = max(peaks[1] - peaks[0], 1)
    base = max(peaks[0] - per_member, 0)
    free, total = torch.cuda.mem_get_info()
    share = space.resources.gpu
    available = int(HEADROOM * (min(free, share * total) if 0 < share < 1 else free))
    largest = max((available - base) // per_member, 0)
    return PackFit(int(largest), int(per_member), int(base), available, point)


def pack_sizing(space: SweepSpace, splits: FeatureSplits) -> str:
    """The dry run's one line on packing; `InputError` if `resources.pack` does not fit."""
    import torch

    if not torch.cuda.is_available():
        return "packing: not sized (no GPU)"
    fit = measure_pack_fit(space, splits)
    pack = space.resources.pack
    if pack > fit.largest:
        raise InputError(f"{space.path}: resources.pack: {pack} does not fit: {fit.detail()}")
    return f"packing: resources.pack {pack} fits: {fit.detail()}"
