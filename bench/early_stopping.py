"""What MO-ASHA early stopping saves on digits, and what it costs the front.

The same space, sampler and seeds run twice per seed: without stopping (FIFO,
every trial runs all its epochs) and with `scheduler: {type: mo_asha}`. For each
run it records the hypervolume of the final Pareto front (completed trials
only, Optuna's `best_trials`: feasible if constrained), the trial-epochs spent
and the wall-clock time. The reference point of the hypervolume is fixed at
(r2 = 0, monoscore_mean = 0), both maximised: a front point counts only for
the area it dominates above that corner.

    python bench/early_stopping.py [--trials 32] [--epochs 16] [--seeds 0 1 2] [--quick]

Target: the median over seeds keeps >= 95 % of the hypervolume with <= 50 % of
the trial-epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine

from monoray.sweep.summary import HV_REFERENCE as REFERENCE
from monoray.sweep.summary import hypervolume_2d

SPACE = {
    "kind": "sae",
    "data": {"features": "digits"},
    "fixed": {"d_sae": 64, "batch_size": 128, "threshold_ema": 0.95},
    "search": {
        "arch": {"type": "categorical", "choices": ["batchtopk", "topk"]},
        "k": {"type": "int", "low": 4, "high": 16, "log": True},
        "mono_coef": {"type": "loguniform", "low": 1e-3, "high": 0.3},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    },
    "objectives": [{"metric": "r2", "mode": "max"}, {"metric": "monoscore_mean", "mode": "max"}],
    "constraints": ["dead_fraction <= 0.5"],
    "baseline": False,
}
GRACE, ETA = 2, 3


def timed_sweep(space: Any, name: str, work: Path) -> tuple[Any, float, Any]:
    """(SweepResult, wall seconds, Optuna study) of one quiet sweep under `work`."""
    import optuna

    from monoray.sweep.runner import SweepOptions, run_sweep

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's console box; stdout is the JSON
        result = run_sweep(space, SweepOptions(name=name, root=str(work), progress=False))
    wall = time.perf_counter() - start
    return result, wall, optuna.load_study(study_name=name, storage=result.storage_url)


def run_one(
    seed: int, trials: int, epochs: int, concurrency: int, stop: dict | None, work: Path
) -> dict:
    from optuna.trial import TrialState

    from monoray.sweep.space import load_space
    from monoray.sweep.tracking import SweepRecords

    name = f"es-{'stop' if stop else 'fifo'}-{seed}"
    doc = {
        **SPACE,
        "name": name,
        "fixed": {**SPACE["fixed"], "epochs": epochs, "seed": seed},
        "sampler": {"type": "tpe", "seed": seed, "n_startup_trials": 8},
        "budget": {"num_samples": trials, "max_concurrent": concurrency, "max_failures": 0},
        **({"scheduler": stop} if stop else {}),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    result, wall, study = timed_sweep(load_space(path), name, work)
    front = [tuple(t.values) for t in study.best_trials]
    records = SweepRecords.load(result.tracking_uri, name)
    epochs_run = 0
    for run_id in records.runs.values():
        history = records.client.get_metric_history(run_id, "epoch")
        epochs_run += int(max((m.step for m in history), default=0))
    states = [t.state for t in study.trials]
    return {
        "seed": seed,
        "stopping": stop is not None,
        "hypervolume": hypervolume_2d(front, REFERENCE),
        "front_size": len(front),
        "trial_epochs": epochs_run,
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--grace", type=int, default=GRACE, help="scheduler.grace_epochs")
    parser.add_argument("--eta", type=int, default=ETA, help="scheduler.reduction_factor")
    parser.add_argument("--quick", action="store_true", help="8 trials x 6 epochs, one seed")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.seeds = 8, 6, [0]

    import ray

    from monoray.runs.cluster import start_local_ray

    stopping = {"type": "mo_asha", "grace_epochs": args.grace, "reduction_factor": args.eta}
    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for stop in (None, stopping):
                runs.append(
                    run_one(seed, args.trials, args.epochs, args.concurrency, stop, Path(tmp))
                )
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    ray.shutdown()
    per_seed = []
    for seed in args.seeds:
        fifo, stop = (
            next(r for r in runs if r["seed"] == seed and r["stopping"] == s) for s in (False, True)
        )
        per_seed.append(
            {
                "seed": seed,
                "hypervolume_kept": stop["hypervolume"] / fifo["hypervolume"]
                if fifo["hypervolume"]
                else None,
                "trial_epochs_fraction": stop["trial_epochs"] / fifo["trial_epochs"],
                "wall_fraction": stop["wall_s"] / fifo["wall_s"],
            }
        )
    kept = statistics.median(s["hypervolume_kept"] or 0.0 for s in per_seed)
    spent = statistics.median(s["trial_epochs_fraction"] for s in per_seed)
    print(
        json.dumps(
            {
                "benchmark": "early_stopping",
                "machine": machine(),
                "trials": args.trials,
                "epochs": args.epochs,
                "seeds": args.seeds,
                "concurrency": args.concurrency,
                "scheduler": stopping,
                "reference_point": {"r2": REFERENCE[0], "monoscore_mean": REFERENCE[1]},
                "runs": runs,
                "per_seed": per_seed,
                "median_hypervolume_kept": round(kept, 4),
                "median_trial_epochs_fraction": round(spent, 4),
                "target": {"hypervolume_kept": 0.95, "trial_epochs_fraction": 0.5},
                "meets_target": kept >= 0.95 and spent <= 0.5,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
