"""The README's `make test` is what CI runs, and pytest's safety nets are configured."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def make_dry_run(target: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "-s", target], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


def test_ci_runs_make_test_and_nothing_else() -> None:
    commands = [
        ln.strip()
        for ln in (REPO / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert commands[-1] == "make test"
    assert not any("CI=" in c or "postgres" in c for c in commands), commands


@pytest.mark.parametrize("target", ["test", "test-all"])
def test_make_test_runs_pytest_under_ci_with_postgres_and_chromium(target: str) -> None:
    pytest_lines = [ln for ln in make_dry_run(target) if " pytest" in ln]
    assert len(pytest_lines) == 1, pytest_lines
    assert pytest_lines[0].startswith("bash .ci/with-services.sh "), pytest_lines
    wrapper = (REPO / ".ci" / "with-services.sh").read_text()
    assert "export CI=true" in wrapper
    assert wrapper.index("\nstart_postgres\n") < wrapper.rindex('\n"$@"')
    assert wrapper.index("\nensure_chromium\n") < wrapper.rindex('\n"$@"')


def test_ensure_chromium_exports_a_working_browser(tmp_path: Path) -> None:
    """What CI's wrapper runs: an installed Chromium is found (or installed) and exported."""
    if not os.environ.get("CI") and not (
        shutil.which("chromium") or shutil.which("chromium-browser")
    ):
        pytest.skip("no Chromium here; outside CI this test does not install it")
    script = 'source .ci/chromium.sh && ensure_chromium && echo "$MONORAY_TEST_CHROMIUM"'
    done = subprocess.run(
        ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    browser = Path(done.stdout.strip().splitlines()[-1])
    assert browser.is_file(), done.stdout
    assert "Chromium" in done.stderr, done.stderr


def test_every_test_gets_a_timeout(request: pytest.FixtureRequest) -> None:
    """This test has no timeout mark: pytest-timeout's default from pyproject applies."""
    assert request.node.get_closest_marker("timeout") is None
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    default = options["ini_options"]["timeout"]
    assert request.config.getini("timeout") == str(default)
    assert float(default) > 0


def test_gpu_marker_is_registered(request: pytest.FixtureRequest) -> None:
    markers = request.config.getini("markers")
    assert any(m.startswith("gpu:") for m in markers), markers
