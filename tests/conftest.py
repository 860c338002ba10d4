"""Shared fixtures: one real local Ray per test session, hypothesis profiles."""

from __future__ import annotations

import os

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
