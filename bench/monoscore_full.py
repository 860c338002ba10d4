"""Exact MonoScore of every latent over N samples in one call, on one device (issue 14).

    python bench/monoscore_full.py                 # N 65,536, d 768, 8192 latents, k 64 per sample
    python bench/monoscore_full.py --quick         # small sizes (smoke test)

The paper reports 1.2 s on an H100 for N = 65,536. Times `monoscore`
(`monoray.metrics`, float64 accumulation) on the same k-sparse activations
given as torch sparse CSR and as a dense [N, M] matrix (dense only when it fits
the `--dense-max-gib` budget), best of `--repeats`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import machine

from monoray.metrics import monoscore

PAPER = {"n": 65536, "d": 768, "m": 8192, "k": 64}
QUICK = {"n": 2048, "d": 64, "m": 512, "k": 8}
PAPER_H100_S = 1.2


def activations(n: int, m: int, k: int, device: torch.device) -> torch.Tensor:
    """[n, m] CSR with k positive entries per row at random latents."""
    gen = torch.Generator().manual_seed(0)
    cols = torch.rand(n, m, generator=gen).topk(k, dim=1).indices.sort(dim=1).values
    values = torch.rand(n, k, generator=gen) + 0.01
    rows = torch.arange(0, n * k + 1, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = torch.sparse_csr_tensor(
            rows, cols.reshape(-1), values.reshape(-1), (n, m), check_invariants=True
        )
    return csr.to(device)


def best_of(fn: Any, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return round(min(times), 4)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--n", type=int, default=None, help="samples (default 65,536)")
    p.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cpu", "cuda"')
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max-gib", type=float, default=8.0)
    args = p.parse_args(argv)
    shape = dict(QUICK if args.quick else PAPER)
    if args.n:
        shape["n"] = args.n
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(shape["n"], shape["d"], generator=gen).to(device)
    sparse = activations(shape["n"], shape["m"], shape["k"], device)
    result: dict[str, Any] = {
        "bench": "monoscore_full",
        "quick": args.quick,
        "machine": machine(),
        "device": str(device),
        "shape": shape,
        "paper_h100_s": PAPER_H100_S,
    }
    monoscore(emb, sparse)  # warm-up (kernels, allocator)
    result["sparse_csr_s"] = best_of(lambda: monoscore(emb, sparse), args.repeats, device)
    dense_gib = shape["n"] * shape["m"] * 4 / 2**30
    if dense_gib <= args.dense_max_gib:
        dense = sparse.to_dense()
        result["dense_s"] = best_of(lambda: monoscore(emb, dense), args.repeats, device)
    else:
        result["dense_s"] = None
        result["dense_skipped"] = f"{dense_gib:.1f} GiB > --dense-max-gib {args.dense_max_gib}"
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
