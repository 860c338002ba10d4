"""`ray job submit` against a real local head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.integration
REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would kill the shared test cluster too)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def wait_for_job_agent(address: str, env: dict, attempts: int = 60) -> None:
    """`ray start` returns before the head's job agent accepts jobs: submit no-ops until one runs.

    Each failed attempt is answered at once ("No available agent to submit job"); the
    wait between attempts is the agent's start-up, not a guess at it.
    """
    env = {**env, "RAY_AUTH_MODE": "token"}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"]
    for _ in range(attempts):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return
        if "agent" not in (done.stdout + done.stderr).lower():
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    raise TimeoutError(f"the job agent of {address} never became ready")


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="mrj-", dir="/tmp")
    # Own ports for everything: the shared test cluster already holds Ray's defaults
    # (its dashboard agent listens on 52365).
    gcs, dash, agent, grpc, metrics = (free_port() for _ in range(5))
    # The job's driver runs `python` from the head's PATH: the project's venv.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_job_agent(address, env)
        yield address, env
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_demo_sweep(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    root = tmp_path / "runs"
    env = {**env, "RAY_ADDRESS": address}
    sets = ["fixed.d_sae=64", "fixed.epochs=1", "fixed.batch_size=128", "budget.num_samples=2"]
    cmd = [
        str(REPO / "jobs" / "submit.sh"),
        "search_spaces/demo.yaml",
        "--root",
        str(root),
        "--quiet",
        *[a for s in sets for a in ("--set", s)],
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{root / 'optuna.db'}")
    assert len(study.trials) == 2
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.trials)
    assert (root / "sweeps" / "demo" / "pareto.csv").is_file()
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        assert token.stat().st_mode & 0o077 == 0, "the Ray token must not be world-readable"
