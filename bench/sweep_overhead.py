"""What Ray Tune + Optuna + MLflow add per trial, against plain in-process Optuna.

Both run the same space (BatchTopK on digits, λ searched, everything else
fixed so trials cost the same) at the same concurrency with the same sampler;
plain Optuna uses threads in one process, monoray uses Tune function trials
with checkpoints every epoch, RDB storage and MLflow records. Ray's start-up is
timed separately (paid once per sweep, not per trial). With a GPU, it also
estimates how many paper-size SAE trials fit on one device by memory.

    python bench/sweep_overhead.py [--trials 16] [--concurrency 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine

SPACE = {
    "name": "overhead",
    "kind": "sae",
    "data": {"features": "digits"},
    "fixed": {
        "arch": "batchtopk",
        "d_sae": 64,
        "k": 8,
        "epochs": 2,
        "batch_size": 128,
        "lr": 0.004,
    },
    "search": {"mono_coef": {"type": "loguniform", "low": 1e-3, "high": 1.0}},
    "sampler": {"type": "tpe", "seed": 0},
    "baseline": False,
}


def plain_optuna(space, splits, trials: int, concurrency: int, work: Path) -> float:
    import optuna
    import torch

    from monoray.sweep.search import DefineByRun, build_sampler
    from monoray.train import TrainConfig, train_sae

    torch.set_num_threads(1)  # Ray gives each 1-CPU trial one thread too
    define = DefineByRun(space.search)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {**space.fixed, **define(trial), **trial.params, "d_in": splits.train.dim}
        cfg = TrainConfig.from_dict(params)
        out = train_sae(cfg, splits, out_dir=work / f"t{trial.number}", progress=False)
        return out["r2"], out["monoscore_mean"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=build_sampler(space))
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials, n_jobs=concurrency)
    return time.perf_counter() - start


def monoray_sweep(space, trials: int, work: Path) -> tuple[float, float, float, float]:
    import ray

    from monoray.runs.cluster import start_local_ray
    from monoray.sweep.runner import SweepOptions, run_sweep

    start = time.perf_counter()
    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's console box; stdout is the JSON
        result = run_sweep(space, SweepOptions(root=str(work), progress=False))
    elapsed = time.perf_counter() - start
    assert result.n_complete + result.n_failed == trials, result
    ray.shutdown()
    return elapsed, ray_start, result.fit_s, result.publish_s


def gpu_capacity() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device on this machine"}
    from monoray.sae import build_sae, config_from_dict

    cfg = config_from_dict(
        {"arch": "batchtopk", "d_in": 768, "d_sae": 8192, "k": 64, "mono_coef": 3e-4}
    )
    sae = build_sae(cfg).cuda()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)
    x = torch.nn.functional.normalize(torch.randn(2048, 768, device="cuda"), dim=1)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        out = sae.forward_train(x, x)
        opt.zero_grad()
        out.loss.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step(opt)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # Each trial process also holds a CUDA context (~0.5 GiB) and the feature batch pipeline.
    per_trial = peak + 768 * 2**20
    return {
        "available": True,
        "peak_step_memory_gib": round(peak / 2**30, 3),
        "per_trial_estimate_gib": round(per_trial / 2**30, 3),
        "trials_per_gpu_by_memory": int(0.9 * total // per_trial),
        "note": "memory bound only; compute is shared, so throughput per trial drops as they pack",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 trials, for a smoke run")
    args = parser.parse_args()
    trials = 4 if args.quick else args.trials

    from monoray.sweep.space import load_space
    from monoray.trials.sae import load_splits

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        doc = {**SPACE, "budget": {"num_samples": trials, "max_concurrent": args.concurrency}}
        (work / "space.yaml").write_text(yaml.safe_dump(doc))
        space = load_space(work / "space.yaml")
        splits = load_splits(space.data)
        plain = plain_optuna(space, splits, trials, args.concurrency, work / "plain")
        sweep, ray_start, fit_s, publish_s = monoray_sweep(space, trials, work / "monoray")
    added = (sweep - plain) / trials
    added_in_trials = (fit_s - plain) / trials
    print(
        json.dumps(
            {
                "benchmark": "sweep_overhead",
                "machine": machine(),
                "trials": trials,
                "concurrency": args.concurrency,
                "plain_optuna_s": round(plain, 2),
                "monoray_s": round(sweep, 2),
                "ray_start_s": round(ray_start, 2),
                "plain_s_per_trial": round(plain / trials, 3),
                "monoray_s_per_trial": round(sweep / trials, 3),
                "added_s_per_trial": round(added, 3),
                "tune_fit_s": round(fit_s, 2),
                "end_of_sweep_publish_s": round(publish_s, 2),
                "added_s_per_trial_excluding_publish": round(added_in_trials, 3),
                "ratio": round(sweep / plain, 3),
                "target_added_s_per_trial": 1.5,
                "meets_target": added <= 1.5,
                "meets_target_excluding_one_off_publish": added_in_trials <= 1.5,
                "gpu": gpu_capacity(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
