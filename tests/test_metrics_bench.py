"""The MonoScore benchmark runs in --quick mode and reports machine, ratios and targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "monoscore.py"


def test_quick_bench_prints_json_with_machine_and_ratios(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_monoscore", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--quick"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["quick"] is True and printed == json.loads(json.dumps(report))
    for key in ("platform", "cpu_model", "cpu_count", "torch", "torch_threads"):
        assert key in printed["machine"]
    scaling = printed["scaling"]
    assert [r["n"] for r in scaling] == [64, 128]
    assert all(
        r["pairwise_over_linear"] > 0 and r["max_abs_diff_vs_pairwise"] < 1e-9 for r in scaling
    )
    assert printed["floor"]["linear_over_floor"] > 0
    assert printed["sparse"]["max_abs_diff"] < 1e-9
    assert printed["loss"]["sparse_rows_fwd_bwd_s"] > 0
    assert set(printed["targets"]) == {
        "pairwise_over_linear_at_4096",
        "linear_over_gemm_floor",
        "sparse_speedup_over_dense",
        "sparse_loss_fwd_bwd_ms",
    }
