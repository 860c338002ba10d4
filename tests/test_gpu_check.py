"""`bench/gpu_check.sh --quick`: the GPU check script runs end to end on CPU (CI smoke test).

Every section (SAE step, MonoScore, packed step, sweep, pytest -m gpu) must run
and land in the one JSON file; on a GPU machine the same script measures them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("sae_step", "monoscore", "packed", "sweep", "pytest")


@pytest.mark.timeout(1500)  # ~60-90 s on an idle 2-core box; its sections are bounded inside
def test_gpu_check_quick_runs_every_section_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    failed = {k: v.get("stderr_tail") for k, v in report["sections"].items() if v["rc"]}
    assert proc.returncode == 0 and report["ok"], failed
    assert tuple(report["sections"]) == SECTIONS and report["quick"] is True
    sections = {k: v.get("result") for k, v in report["sections"].items()}
    step = sections["sae_step"]["results"]["batchtopk"]
    assert step["path"] == "sparse" and {"auto", "dense", "sparse"} <= set(step["ms_per_step"])
    assert sections["monoscore"]["sparse_csr_s"] > 0
    assert set(sections["packed"]["results"]) == {"1", "2"}


def test_gpu_check_rejects_an_unknown_argument(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--fast"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: unknown argument --fast (use --quick, --out FILE)"
