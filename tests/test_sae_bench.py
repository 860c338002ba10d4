"""Smoke run of bench/sae_step.py --quick: it runs and reports what the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sae_step.py"


def test_quick_bench_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("sae_step_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--quick", "--reps", "1", "--warmup", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    machine = report["machine"]
    for key in ("platform", "cpu_model", "cpu_count", "torch", "torch_threads", "device"):
        assert machine[key] not in (None, "")
    result = report["results"]["batchtopk"]
    assert result["path"] in ("sparse", "dense")
    assert set(result["ms_per_step"]) == {"auto", "auto_mono", "dense"}
    assert result["mono_overhead_ratio"] > 0 and result["speedup_vs_dense"] > 0
    assert report["targets"] == {"mono_overhead_ratio_max": 1.05, "speedup_vs_dense_min": 1.5}
