"""One SAE training step at the paper's size: sparse vs plain dense, with and without MonoLoss.

    python bench/sae_step.py                  # BatchTopK, batch 2048, d 768, 8192 latents, k 64
    python bench/sae_step.py --arch all       # every architecture
    python bench/sae_step.py --quick          # small sizes, seconds (smoke test)

A step is what `monoray.train` does per batch: forward_train, backward, decoder
gradient projection, grad-norm clip 1.0, Adam (lr 1e-4, eps 6.25e-10, fused as
in the trainer), decoder renorm. MonoLoss runs at the SAE default
`mono_precision` (float32 products, float64 statistics); `--mono-float64` also
times the all-float64 variant (`auto_mono_float64`). Variants run interleaved (one step of each per round) so background
load hits them alike. Prints one JSON object: ms per step (median and min) of
`auto` (the implementation `impl="auto"` picks on this device, named in
`path`), `auto_mono` (same with mono_coef > 0) and `dense` (plain autograd
reference, `impl="dense"`); the MonoLoss overhead ratio auto_mono / auto
(target <= 1.05) and the speedup dense / auto (target >= 1.5), from the
fastest step of each variant (on a shared box other jobs only ever add time,
so the minimum is the best estimate of the undisturbed cost; the ratios of the
medians are reported too); and MonoLoss alone (`monoloss_alone_ms`).

JumpReLU and vanilla fire on about half the latents at init; to time the regime
a trained model is in, their thresholds (jumprelu) or encoder biases (vanilla)
are first set so that about k latents fire per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monoray.sae import ARCH_NAMES, SAEConfig, SparseAutoencoder, build_sae

PAPER = {"batch": 2048, "d_in": 768, "d_sae": 8192, "k": 64}
QUICK = {"batch": 256, "d_in": 64, "d_sae": 1024, "k": 8}
TARGETS = {"mono_overhead_ratio_max": 1.05, "speedup_vs_dense_min": 1.5}
MONO_COEF = 3e-4
"""λ of the MonoLoss variant (paper BatchTopK range); the cost does not depend on it."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_start"] = round(os.getloadavg()[0], 2)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calibrate(sae: SparseAutoencoder, x: torch.Tensor, k: int) -> None:
    """Make about k latents fire per sample (jumprelu: thresholds; vanilla: b_enc)."""
    pre = torch.relu(torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.t()))
    share = 1.0 - k / pre.shape[1]
    cut = torch.quantile(pre[: min(512, pre.shape[0])].float(), share, dim=0).clamp_min(1e-6)
    if sae.cfg.arch == "jumprelu":
        sae.log_threshold.copy_(cut.log())
    elif sae.cfg.arch == "vanilla":
        sae.b_enc.sub_(cut)


def make_step(
    sae: SparseAutoencoder, x: torch.Tensor, fused_adam: bool
) -> tuple[Callable[[], str], torch.optim.Optimizer]:
    kwargs = {"fused": True} if fused_adam else {}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10, **kwargs)
    emb = x.clone()

    def step() -> str:
        out = sae.forward_train(x, emb)
        loss = out.loss.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.after_optimizer_step(opt)
        return out.path

    return step, opt


def bench_arch(
    arch: str, shape: dict[str, int], device: torch.device, reps: int, warmup: int, args: Any
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape["batch"], shape["d_in"], generator=gen)
    x = (x / x.norm(dim=1, keepdim=True)).to(device)
    default_precision = SAEConfig(arch=arch, d_in=1).mono_precision
    variants = {
        "auto": ("auto", 0.0, default_precision),
        "auto_mono": ("auto", MONO_COEF, default_precision),
        "dense": ("dense", 0.0, default_precision),
    }
    if args.mono_float64:
        variants["auto_mono_float64"] = ("auto", MONO_COEF, "float64")
    if args.dense_mono:
        variants["dense_mono"] = ("dense", MONO_COEF, default_precision)
    if args.sparse:
        variants["sparse"] = ("sparse", 0.0, default_precision)
    steps: dict[str, Callable[[], str]] = {}
    models: dict[str, SparseAutoencoder] = {}
    paths: dict[str, str] = {}
    for name, (impl, mono, precision) in variants.items():
        cfg = SAEConfig(
            arch=arch,
            d_in=shape["d_in"],
            d_sae=shape["d_sae"],
            k=shape["k"],
            mono_coef=mono,
            mono_precision=precision,
            impl=impl,
        )
        sae = build_sae(cfg).to(device)
        calibrate(sae, x, shape["k"])
        models[name] = sae
        steps[name], _ = make_step(sae, x, not args.unfused_adam)
    for _ in range(warmup):
        for name, step in steps.items():
            paths[name] = step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(reps):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            sync(device)
            t0 = time.perf_counter()
            paths[name] = steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    mono_ms = time_mono(models["auto"], x, device, reps, default_precision)
    ratio = best["auto_mono"] / best["auto"]
    speedup = best["dense"] / best["auto"]
    if args.sparse:
        extra = {"speedup_sparse_vs_dense": round(best["dense"] / best["sparse"], 3)}
    else:
        extra = {}
    return {
        **extra,
        "path": paths["auto"],
        "mono_precision": default_precision,
        "paths": paths,
        "ms_per_step": {
            name: {"median": round(med[name], 2), "min": round(min(ts), 2)}
            for name, ts in times.items()
        },
        "monoloss_alone_ms": mono_ms,
        "mono_overhead_ratio": round(ratio, 4),
        "speedup_vs_dense": round(speedup, 3),
        "mono_overhead_ratio_of_medians": round(med["auto_mono"] / med["auto"], 4),
        "speedup_vs_dense_of_medians": round(med["dense"] / med["auto"], 3),
        "meets_targets": {
            "mono_overhead": ratio <= TARGETS["mono_overhead_ratio_max"],
            "speedup_vs_dense": speedup >= TARGETS["speedup_vs_dense_min"],
        },
    }


def time_mono(
    sae: SparseAutoencoder, x: torch.Tensor, device: torch.device, reps: int, precision: str
) -> dict:
    """MonoLoss alone (the metrics core's sparse entry) on this batch's latents: ms."""
    from monoray.metrics import mono_loss_rows

    lat = sae.forward_train(x, x).latents.detach()  # the training batch's latents
    fwd, bwd = [], []
    for _ in range(reps + 1):
        values = lat.values.detach().requires_grad_()
        sync(device)
        t0 = time.perf_counter()
        loss = mono_loss_rows(
            x, values, lat.col_indices, lat.row_offsets, lat.n_latents, precision=precision
        )
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        fwd.append((t1 - t0) * 1e3)
        bwd.append((time.perf_counter() - t1) * 1e3)
    return {
        "forward": round(statistics.median(fwd[1:]), 2),
        "backward": round(statistics.median(bwd[1:]), 2),
        "nnz": lat.nnz,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="batchtopk", choices=[*ARCH_NAMES, "all"])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cpu", "cuda"')
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--unfused-adam", action="store_true", help="Adam(fused=False) instead")
    p.add_argument("--mono-float64", action="store_true", help="also time float64 MonoLoss")
    p.add_argument("--dense-mono", action="store_true", help="also time dense + MonoLoss")
    p.add_argument("--sparse", action="store_true", help="also time impl=sparse (GPU: not auto)")
    for key, value in PAPER.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"{value}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    shape = dict(QUICK if args.quick else PAPER)
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    reps = args.reps or (3 if args.quick else 7)
    archs = list(ARCH_NAMES) if args.arch == "all" else [args.arch]
    report: dict[str, Any] = {
        "bench": "sae_step",
        "quick": args.quick,
        "machine": machine_info(device),
        "shape": shape,
        "step": "forward_train + backward + decoder grad projection + clip 1.0 + "
        f"Adam(lr=1e-4, eps=6.25e-10{'' if args.unfused_adam else ', fused'}) + renorm",
        "mono_coef": MONO_COEF,
        "reps": reps,
        "warmup": args.warmup,
        "targets": TARGETS,
        "results": {},
    }
    t0 = time.perf_counter()
    for arch in archs:
        report["results"][arch] = bench_arch(arch, shape, device, reps, args.warmup, args)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
