"""The links monoray prints, opened in a real browser: headless Debian Chromium on `monoray ui`.

Over a finished demo sweep (`finished_demo`), `monoray ui` serves MLflow on a free port of
127.0.0.1; Playwright (its own driver, no browser download) drives `/usr/bin/chromium`
through the experiment, the parent run (the sweep's summary metrics and note, whose links
open the front's runs), a front trial (its metrics, MonoScore profile and activating
samples) and every image artifact of both, and checks that MLflow shows its model-training
view, not the GenAI one. Screenshots land in the
test's tmp dir; `MONORAY_SCREENSHOTS_TO=docs` copies the three the README shows there.
CI (`.ci/with-services.sh`) installs Chromium and exports MONORAY_TEST_CHROMIUM; without a
Chromium the tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from monoray.sweep.links import run_url, server_url
from monoray.sweep.summary import HV_KEY
from monoray.sweep.tracking import PARETO_TAG, SweepRecords
from monoray.sweep.views import ACTIVATIONS_IMAGE, PROFILE_IMAGE
from tests.conftest import FinishedSweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
CHROMIUM_ENV = "MONORAY_TEST_CHROMIUM"
SCREENSHOTS_ENV = "MONORAY_SCREENSHOTS_TO"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}
LOAD_MS = 180_000
"""The UI's first page load on a loaded 2-core machine (its JS bundle is large)."""
SERVER_START_S = 600
GENAI_ONLY = ("Observability", "Detect Issues")
"""Text of MLflow's GenAI experiment view that its model-training view does not have."""
SUMMARY_METRICS = (HV_KEY, "trials_complete", "trials_failed", "best_r2", "baseline_r2")
LINK = re.compile(r"^(experiment|parent run): (\S+)$", flags=re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Ui:
    base: str
    links: dict[str, str]
    records: SweepRecords


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM_ENV} is not set: .ci/with-services.sh installs Chromium")
    pytest.skip(f"no Chromium: apt-get install chromium, or set {CHROMIUM_ENV}")


@pytest.fixture(scope="module")
def ui(finished_demo: FinishedSweep, chromium: str, tmp_path_factory) -> Iterator[Ui]:
    """`monoray ui --port P` over the finished sweep, until its /health answers."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ui") / "ui.log"
    cmd = [sys.executable, "-m", "monoray", "ui", "--root", str(finished_demo.root)]
    with log_path.open("w") as log:  # a file, not a pipe: the server logs every request
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = server_url("127.0.0.1", port)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)  # polling the server's health endpoint, not a stand-in for it
        links = dict(LINK.findall(log_path.read_text()))
        records = SweepRecords.load(
            f"sqlite:///{finished_demo.root / 'mlflow.db'}", finished_demo.name
        )
        yield Ui(base, links, records)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.fixture
def page(chromium: str, tmp_path: Path):
    """A page of a fresh headless Chromium (a new empty profile: no remembered view)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport=VIEWPORT,
        )
        context.set_default_timeout(LOAD_MS)
        yield context.pages[0] if context.pages else context.new_page()
        context.close()


def shoot(page, tmp_path: Path, name: str) -> Path:
    """A screenshot without MLflow's assistant side panel; copied to $MONORAY_SCREENSHOTS_TO."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get(SCREENSHOTS_ENV):
        shutil.copy(path, Path(os.environ[SCREENSHOTS_ENV]) / name)
    return path


def assert_model_training_view(page) -> None:
    page.get_by_role("link", name="Runs").first.wait_for()
    for text in GENAI_ONLY:
        assert page.get_by_text(text, exact=True).count() == 0, text


def assert_image_artifact_loads(page, ui: Ui, run_id: str, path: str) -> None:
    """The run's artifact view of `path` fetches it (200) and the browser decodes it."""
    route = run_url(ui.base, ui.records.experiment_id, run_id).replace(
        f"/runs/{run_id}?", f"/runs/{run_id}/artifacts/{path}?"
    )
    page.goto("about:blank")  # a new load: the UI does not follow a changed artifact path
    with page.expect_response(lambda r: "/get-artifact" in r.url and "path=" in r.url) as got:
        page.goto(route)
    assert got.value.status == 200, (path, got.value.url)
    assert got.value.headers.get("content-type") == "image/png", (path, got.value.headers)
    image = page.locator("img[src^='blob:']").first
    image.wait_for()
    assert image.evaluate("e => e.complete && e.naturalWidth > 0"), path


def on_front(client: MlflowClient, run_id: str) -> bool:
    return client.get_run(run_id).data.tags.get(PARETO_TAG) == "true"


def image_artifacts(client: MlflowClient, run_id: str, under: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, under or None):
        if item.is_dir:
            found += image_artifacts(client, run_id, item.path)
        elif item.path.endswith(".png"):
            found.append(item.path)
    return found


def test_ui_prints_the_sweeps_links_for_its_own_port(ui: Ui, finished_demo: FinishedSweep):
    sweep_links = dict(LINK.findall(finished_demo.stdout))
    assert set(ui.links) == {"experiment", "parent run"}
    for kind, link in ui.links.items():
        assert link.startswith(f"{ui.base}/#/")
        assert link.removeprefix(ui.base) == sweep_links[kind].partition(":5000")[2]


def test_experiment_link_opens_the_model_training_view(ui: Ui, page, tmp_path: Path):
    page.goto(ui.links["experiment"])
    page.get_by_role("heading", name="Runs").wait_for()
    assert_model_training_view(page)
    page.get_by_text(f"{1 + len(ui.records.runs)} matching runs").wait_for()  # parent + trials
    shoot(page, tmp_path, "mlflow_experiment.png")
    # Without the query a first visit lands in the GenAI view: why every link carries it.
    page.goto(ui.links["experiment"].partition("?")[0])
    page.get_by_text(GENAI_ONLY[0], exact=True).first.wait_for()


def test_parent_run_link_shows_the_sweep_summary(ui: Ui, page, tmp_path: Path):
    parent = ui.records.client.get_run(ui.records.parent_run_id)
    page.goto(ui.links["parent run"])
    page.get_by_role("heading", name=parent.info.run_name).wait_for()
    assert_model_training_view(page)
    for number in sorted(ui.records.runs):  # the trials, as child runs
        page.get_by_role("link", name=f"trial-{number:04d}").first.wait_for()
    # The sweep's summary (monoray/sweep/summary.py): metrics and the note with the front.
    assert set(SUMMARY_METRICS) <= set(parent.data.metrics), sorted(parent.data.metrics)
    page.get_by_text(f"Metrics ({len(parent.data.metrics)})").wait_for()
    for key in parent.data.metrics:
        page.get_by_text(key, exact=True).first.wait_for()
    assert MLFLOW_RUN_NOTE in parent.data.tags
    page.get_by_text("Hypervolume of the front").wait_for()
    shoot(page, tmp_path, "mlflow_parent_run.png")
    # The note links each front trial's run, in the model-training view.
    front = sorted(n for n, r in ui.records.runs.items() if on_front(ui.records.client, r))
    name = f"trial-{front[0]:04d}"
    link = page.locator("a[href*='workflowType=machine_learning']", has_text=name).first
    with page.context.expect_page() as opened:  # the note's links open a new tab
        link.click()
    trial_page = opened.value
    trial_page.get_by_role("heading", name=name).wait_for()
    assert_model_training_view(trial_page)
    trial_page.close()

    images = image_artifacts(ui.records.client, ui.records.parent_run_id)
    assert {"pareto_front.png", "pareto/pareto_front.png"} <= set(images), images
    for path in images:
        assert_image_artifact_loads(page, ui, ui.records.parent_run_id, path)


def test_front_trial_page_shows_its_metrics_and_images(ui: Ui, page, tmp_path: Path):
    client = ui.records.client
    front = client.search_runs(
        [ui.records.experiment_id], filter_string=f"tags.`{PARETO_TAG}` = 'true'"
    )
    assert front, "no trial on the front"
    run = front[0]
    page.goto(run_url(ui.base, ui.records.experiment_id, run.info.run_id))
    page.get_by_role("heading", name=run.info.run_name).wait_for()
    assert_model_training_view(page)
    for key in ("r2", "monoscore_mean"):
        assert key in run.data.metrics
        page.get_by_text(key, exact=True).first.wait_for()
    shoot(page, tmp_path, "mlflow_front_trial.png")
    images = image_artifacts(client, run.info.run_id)
    assert {PROFILE_IMAGE, ACTIVATIONS_IMAGE} <= set(images), images  # profile, activations
    for path in images:
        assert_image_artifact_loads(page, ui, run.info.run_id, path)
