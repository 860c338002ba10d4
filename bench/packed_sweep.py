"""What packing trials (`resources.pack`) buys a sweep: the same digits sweep unpacked vs packed.

`search_spaces/demo.yaml` (its demo settings: d_sae 128, 8 epochs, batch 32,
TPE seed 42) with 16 trials runs twice at the same concurrency (Tune trials at
a time): every trial its own Tune trial, then `pack: 8` (two Tune trials of 8
members). It records the wall-clock of each sweep (`Tuner.fit` plus the
publish), their ratio, and the hypervolume of each final Pareto front
(Optuna's `best_trials`, reference point r2 = 0, monoscore_mean = 0, as in
`bench/early_stopping.py`), so a reader sees whether packing cost search
quality. If `bench/packed_step.py` (the engine's paper-size step per member,
P = 1 vs 4) is present, its JSON is included under `packed_step`.

    python bench/packed_sweep.py [--trials 16] [--pack 8] [--concurrency 2] [--quick] [--no-step]

Target: packed >= 3x faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine
from early_stopping import REFERENCE, hypervolume_2d, timed_sweep

REPO = Path(__file__).parents[1]
DEMO = REPO / "search_spaces" / "demo.yaml"
STEP_BENCH = Path(__file__).parent / "packed_step.py"
TARGET_SPEEDUP = 3.0


def run_one(trials: int, pack: int, concurrency: int, sets: list[str], work: Path) -> dict:
    from optuna.trial import TrialState

    from monoray.sweep.space import load_space

    name = f"pack-{pack}"
    overrides = [
        f"budget.num_samples={trials}",
        f"budget.max_concurrent={concurrency}",
        f"resources.pack={pack}",
        *sets,
    ]
    result, wall, study = timed_sweep(load_space(DEMO, overrides), name, work)
    front = [tuple(t.values) for t in study.best_trials]
    states = [t.state for t in study.trials]
    return {
        "pack": pack,
        "wall_s": round(wall, 1),
        "fit_s": round(result.fit_s, 1),
        "s_per_trial": round(wall / trials, 2),
        "hypervolume": round(hypervolume_2d(front, REFERENCE), 5),
        "front_size": len(front),
        "complete": states.count(TrialState.COMPLETE),
        "failed": states.count(TrialState.FAIL),
    }


def packed_step() -> dict | None:
    """The engine's own bench (`bench/packed_step.py`, paper size), if it is there."""
    if not STEP_BENCH.is_file():
        return None
    done = subprocess.run(
        [sys.executable, str(STEP_BENCH)], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--pack", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 trials x 2 epochs, pack 2")
    parser.add_argument("--no-step", action="store_true", help="leave out bench/packed_step.py")
    args = parser.parse_args()
    sets = []
    if args.quick:
        args.trials, args.pack, sets = 4, 2, ["fixed.epochs=2"]

    import ray

    from monoray.runs.cluster import start_local_ray

    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            run_one(args.trials, pack, args.concurrency, sets, Path(tmp)) for pack in (1, args.pack)
        ]
    ray.shutdown()
    unpacked, packed = runs
    speedup = unpacked["wall_s"] / packed["wall_s"]
    print(
        json.dumps(
            {
                "benchmark": "packed_sweep",
                "machine": machine(),
                "space": str(DEMO.relative_to(REPO)),
                "trials": args.trials,
                "concurrency": args.concurrency,
                "extra_sets": sets,
                "reference_point": {"r2": REFERENCE[0], "monoscore_mean": REFERENCE[1]},
                "unpacked": unpacked,
                "packed": packed,
                "speedup": round(speedup, 2),
                "hypervolume_ratio": round(packed["hypervolume"] / unpacked["hypervolume"], 4)
                if unpacked["hypervolume"]
                else None,
                "packed_step": None if args.no_step else packed_step(),
                "target": {"speedup": TARGET_SPEEDUP},
                "meets_target": speedup >= TARGET_SPEEDUP,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
