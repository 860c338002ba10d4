"""Shared fixtures: one real local Ray per test session, hypothesis profiles."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI runs derandomized so a red build is reproducible; locally explore more.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# `make test` runs pytest under `uv run`; Ray must not re-launch workers through uv.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# `make test` runs two pytest-xdist workers: each starts its own local Ray (and so do the
# sweep drivers it spawns) in its own temp dir, so that neither finds the other's cluster
# (`ray.init` joins the cluster its temp dir records) nor its session files.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    os.environ["RAY_TMPDIR"] = str(base / worker)
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where CUDA is, and skip (saying why) where it is not."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (`ray.init` costs ~7 s).

    Logical CPUs are over-declared so two concurrent trials (and Train workers)
    fit on a 2-core CI machine; the work itself still shares the real cores.
    """
    import ray

    from monoray.runs.cluster import start_local_ray

    start_local_ray(
        num_cpus=4,
        num_gpus=0,  # tests about "the cluster has 0 GPUs" hold on GPU machines too
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=256 * 1024**2,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throwaway monoray project directory (mlflow.db, optuna.db, artifacts, ray results)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("MONORAY_HOME", str(root))
    return root


@dataclass(frozen=True, slots=True)
class FinishedSweep:
    """A sweep the CLI ran to the end, as a user runs it (output not a terminal)."""

    root: Path
    name: str
    stdout: str
    stderr: str


DEMO_SPACE = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"
SMALL_DEMO = ["budget.num_samples=4", "fixed.epochs=2", "fixed.d_sae=64", "fixed.batch_size=128"]


@pytest.fixture(scope="session")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """A small `monoray sweep search_spaces/demo.yaml` in a throwaway project, once a session."""
    root = tmp_path_factory.mktemp("finished-demo") / "runs"
    name = "demo-small"
    sets = [arg for s in SMALL_DEMO for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "monoray", "sweep", str(DEMO_SPACE), "--name", name]
    done = subprocess.run(
        [*cmd, "--root", str(root), *sets], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return FinishedSweep(root, name, done.stdout, done.stderr)
