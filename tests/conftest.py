"""Shared fixtures: one real local Ray per test session, hypothesis profiles."""

from __future__ import annotations

import os

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
