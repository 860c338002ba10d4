"""Soak: hundreds of short trials through one sweep driver; records audited, driver memory tracked.

Runs `search_spaces/demo.yaml` shrunk to ~1 s trials (a digits subset, 2
epochs, d_sae 64) with `--trials` trials at `--concurrency` on a fresh local
Ray (half a logical CPU per trial, so 4 trials share this 2-core machine),
then `monoray.sweep.audit.audit_sweep` compares the Optuna study, the MLflow
runs and the checkpoints. A thread samples the driver's RSS (this process:
Tune controller, searcher, MLflow writer) every `--every` seconds; "flat"
means the RSS after the warm-up (the first 20 % of the trials) and at the end
differ little, and the least-squares slope over the post-warm-up samples is
reported per 100 trials (both up to the last trial, before the one-off Pareto
publish; the peak covers everything). Prints one JSON object.

    python bench/soak.py [--trials 200] [--concurrency 4] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
WARMUP = 0.2
"""Fraction of the trials (by finished count) treated as warm-up."""
EPOCHS = 2


def soak_space(trials: int, concurrency: int) -> list[str]:
    return [
        "data.subset=400",
        "fixed.d_sae=64",
        f"fixed.epochs={EPOCHS}",
        "fixed.batch_size=64",
        f"budget.num_samples={trials}",
        f"budget.max_concurrent={concurrency}",
        f"resources.cpu={2 / concurrency:g}",
    ]


class RssSampler(threading.Thread):
    """Samples (seconds since start, RSS bytes, finished trials) of this process."""

    def __init__(self, exp_dir: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.exp_dir = exp_dir
        self.every = every
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self._start = time.perf_counter()

    def finished(self) -> int:
        """Trials whose last Tune result (in their result.json) is their last epoch."""
        last = f'"epoch": {EPOCHS},'.encode()
        count = 0
        for path in self.exp_dir.glob("*/result.json"):
            with open(path, "rb") as fh:
                fh.seek(max(path.stat().st_size - 8192, 0))
                tail = fh.read().splitlines()
            count += bool(tail) and last in tail[-1]
        return count

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.samples.append(
                (time.perf_counter() - self._start, me.memory_info().rss, self.finished())
            )
            self.stop.wait(self.every)


def slope_per_trial(samples: list[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS (bytes) against finished trials."""
    xs = [float(n) for _, _, n in samples]
    ys = [float(r) for _, r, _ in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--root", help="project directory (default: a temporary one)")
    parser.add_argument("--every", type=float, default=0.5, help="RSS sampling period (s)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    from monoray.sweep.audit import audit_sweep
    from monoray.sweep.paths import ProjectPaths
    from monoray.sweep.runner import SweepOptions, run_sweep
    from monoray.sweep.space import load_space

    root = Path(args.root or tempfile.mkdtemp(prefix="monoray-soak-"))
    name = f"soak-{args.trials}"
    space = load_space(
        REPO / "search_spaces" / "demo.yaml", soak_space(args.trials, args.concurrency)
    )
    sampler = RssSampler(ProjectPaths.resolve(root).ray_results / name, args.every)
    start = time.perf_counter()
    sampler.start()
    try:
        result = run_sweep(space, SweepOptions(name=name, root=str(root), progress=False))
    finally:
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    audit_start = time.perf_counter()
    report = audit_sweep(name, root=root)
    audit_s = time.perf_counter() - audit_start

    samples = sampler.samples
    # The trial phase after warm-up: from the first sample with WARMUP of the trials finished
    # to the first with all finished (the one-off Pareto publish after it is not per trial).
    warm = [s for s in samples if WARMUP * args.trials <= s[2] < args.trials]
    warm += [s for s in samples if s[2] >= args.trials][:1]
    warm = warm or samples
    rss_warm, rss_end = warm[0][1], warm[-1][1]
    out = {
        "bench": "soak",
        "trials": args.trials,
        "concurrency": args.concurrency,
        "wall_s": round(wall, 1),
        "fit_s": round(result.fit_s, 1),
        "s_per_trial": round(result.fit_s / args.trials, 3),
        "complete": result.n_complete,
        "failed": result.n_failed,
        "interrupted": result.interrupted,
        "driver_rss_start_mib": round(samples[0][1] / MIB, 1),
        "driver_rss_after_warmup_mib": round(rss_warm / MIB, 1),
        "driver_rss_trials_done_mib": round(rss_end / MIB, 1),
        "driver_rss_end_mib": round(samples[-1][1] / MIB, 1),
        "driver_rss_peak_mib": round(max(r for _, r, _ in samples) / MIB, 1),
        "driver_rss_growth_after_warmup_mib": round((rss_end - rss_warm) / MIB, 1),
        "driver_rss_slope_mib_per_100_trials": round(slope_per_trial(warm) * 100 / MIB, 2),
        "rss_samples": len(samples),
        "records_audited": {
            "trials": report.n_trials,
            "mlflow_runs": report.n_runs,
            "metric_steps": report.n_metric_steps,
            "checkpoints": report.n_checkpoints,
        },
        "audit_s": round(audit_s, 1),
        "problems": [str(p) for p in report.problems],
        "records_lost": report.records_lost,
        "root": str(root),
        "machine": machine(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
