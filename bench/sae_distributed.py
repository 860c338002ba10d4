"""One BatchTopK + MonoLoss SAE step on W ranks vs one process, at the paper size.

Prints JSON: the step time of W = 1 and W (their ratio, measured in this one
run), and per step on the W ranks the time spent in torch.distributed calls
and the bytes they moved (per rank, by call). Backend: gloo on CPU, NCCL when
--device cuda (one GPU per rank). Ranks are spawned processes (no Ray: this
measures the step, not TorchTrainer's start-up).

    python bench/sae_distributed.py --workers 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine

from monoray.sae import SAEConfig, build_sae
from monoray.sae.collective import Ranks

PAPER = {"batch": 2048, "d_in": 768, "d_sae": 8192, "k": 64}


def _sae(device: torch.device, mono_coef: float) -> tuple[Any, torch.optim.Optimizer]:
    cfg = SAEConfig(
        arch="batchtopk",
        d_in=PAPER["d_in"],
        d_sae=PAPER["d_sae"],
        k=PAPER["k"],
        mono_coef=mono_coef,
    )
    sae = build_sae(cfg).to(device)
    return sae, torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)


def _batch(device: torch.device) -> torch.Tensor:
    x = torch.randn(PAPER["batch"], PAPER["d_in"], generator=torch.Generator().manual_seed(0))
    return (x / x.norm(dim=1, keepdim=True)).to(device)


def _step(sae: Any, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    out = sae.forward_train(x)
    opt.zero_grad(set_to_none=True)
    out.loss.loss.backward()
    sae.collective.sum_grads(sae.parameters())
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step(opt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(sae: Any, opt: Any, x: torch.Tensor, steps: int, device: torch.device) -> float:
    _step(sae, opt, x)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        _step(sae, opt, x)
    _sync(device)
    return (time.perf_counter() - start) / steps


class _Meter:
    """Wraps the torch.distributed calls the step makes: seconds and bytes per call name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        for name in ("all_reduce", "all_gather_into_tensor", "all_gather"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor | list)]
            sent = tensors[-1] if name != "all_reduce" else tensors[0]
            size = sum(
                t.numel() * t.element_size() for t in (sent if isinstance(sent, list) else [sent])
            )
            _sync(self.device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - start
            self.bytes[name] += size
            self.calls[name] += 1
            return result

        return wrapped

    def reset(self) -> None:
        self.seconds.clear()
        self.bytes.clear()
        self.calls.clear()


def _rank(
    rank: int, world: int, init: str, device_name: str, steps: int, mono_coef: float, out: str
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    backend = "nccl" if device_name == "cuda" else "gloo"
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    try:
        meter = _Meter(device)
        sae, opt = _sae(device, mono_coef)
        sae.collective = Ranks(device=device)
        x = torch.tensor_split(_batch(device), world)[rank]
        _step(sae, opt, x)  # warm-up (not metered)
        meter.reset()
        seconds = _timed(sae, opt, x, steps, device)
        n = steps + 1  # _timed's own warm-up step is metered too
        report = {
            "step_s": seconds,
            "comm_s_per_step": sum(meter.seconds.values()) / n,
            "comm_bytes_per_step": sum(meter.bytes.values()) // n,
            "by_call": {
                k: {
                    "calls_per_step": meter.calls[k] / n,
                    "s_per_step": meter.seconds[k] / n,
                    "bytes_per_step": meter.bytes[k] // n,
                }
                for k in meter.calls
            },
        }
        Path(out, f"rank-{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mono-coef", type=float, default=3e-4, help="0: BatchTopK alone")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    load_start = os.getloadavg()[0]
    sae, opt = _sae(device, args.mono_coef)
    single = _timed(sae, opt, _batch(device), args.steps, device)
    del sae, opt
    with tempfile.TemporaryDirectory() as out:
        init = os.path.join(out, "init")
        mp.start_processes(
            _rank,
            args=(args.workers, init, args.device, args.steps, args.mono_coef, out),
            nprocs=args.workers,
            start_method="spawn",
        )
        ranks = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(args.workers)]
    step = max(r["step_s"] for r in ranks)
    report = {
        "bench": "sae_distributed",
        "size": PAPER,
        "arch": "batchtopk",
        "mono_coef": args.mono_coef,
        "device": args.device,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "workers": args.workers,
        "steps": args.steps,
        "step_s_w1": round(single, 4),
        f"step_s_w{args.workers}": round(step, 4),
        "speedup": round(single / step, 3),
        "comm_s_per_step": round(max(r["comm_s_per_step"] for r in ranks), 4),
        "comm_share_of_step": round(max(r["comm_s_per_step"] for r in ranks) / step, 3),
        "comm_mib_per_step_per_rank": round(ranks[0]["comm_bytes_per_step"] / 2**20, 2),
        "by_call_rank0": ranks[0]["by_call"],
        "machine": {
            **machine(),
            "load_avg_1m_start": round(load_start, 2),
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        },
    }
    if args.device == "cpu":
        report["note"] = (
            "CPU only: no GPU in this session, so no NCCL numbers; ranks share the machine's "
            "cores (threads split between ranks), so the W=1 vs W ratio is the cost of the "
            "split plus communication, not a multi-GPU speed-up"
        )
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
