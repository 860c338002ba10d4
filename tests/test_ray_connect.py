"""Starting or joining Ray in bounded time (`monoray.runs.cluster.start_ray`), through the CLI.

Every command runs as a real `python -m monoray` subprocess with its own RAY_TMPDIR, so it
gets its own Ray (or none), apart from the test session's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from monoray.extract import EncoderSpec, ExtractConfig, extract
from monoray.runs.cluster import TIMEOUT_ENV

pytestmark = pytest.mark.integration
REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
BOUND_S = "5"
# Far above BOUND_S plus start-up; the code before the fix waited ~14 min for such addresses.
HANG_GUARD_S = 120
DEMO = ["sweep", str(REPO / "search_spaces" / "demo.yaml"), "--quiet"]
DEMO += ["--set", "budget.num_samples=2", "--set", "fixed.epochs=1", "--set", "fixed.d_sae=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A short RAY_TMPDIR under /tmp (Ray's socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mrc-", dir="/tmp"))
    (path / "ray").mkdir()
    try:
        yield path
    finally:
        for proc in psutil.process_iter(["cmdline"]):  # only Ray processes of this directory
            if str(path) in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        shutil.rmtree(path, ignore_errors=True)


def monoray(
    args: list[str], cwd: Path, ray_tmpdir: Path, **env: str
) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TIMEOUT_ENV)}
    full |= {
        "RAY_TMPDIR": str(ray_tmpdir),
        "MONORAY_HOME": str(cwd / "project"),
        "RAY_USAGE_STATS_ENABLED": "0",
        TIMEOUT_ENV: BOUND_S,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "monoray", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def assert_one_line_exit_2(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_created(cwd: Path) -> None:
    """No project dir (studies, MLflow db, sweep dirs) and no ./monoray-runs."""
    assert sorted(p.name for p in cwd.iterdir()) == [], sorted(cwd.iterdir())


@pytest.mark.timeout(600)
def test_stale_recorded_cluster_is_ignored_without_an_address(tmp_path, ray_tmpdir) -> None:
    """A dead cluster in ray_current_cluster: the demo sweep starts its own Ray and completes."""
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    done = subprocess.run(
        [sys.executable, "-m", "monoray", *DEMO],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "RAY_TMPDIR": str(ray_tmpdir),
            "MONORAY_HOME": str(tmp_path / "project"),
            "RAY_USAGE_STATS_ENABLED": "0",
        },
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep demo: 2 trials complete, 0 failed" in done.stdout
    assert "Failed to connect to GCS" not in done.stderr
    assert (tmp_path / "project" / "sweeps" / "demo" / "pareto.csv").is_file()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_sweep_to_an_unused_port_fails_in_one_line_creating_nothing(
    tmp_path, ray_tmpdir, how
) -> None:
    address = f"127.0.0.1:{free_port()}"
    if how == "--address":
        done = monoray([*DEMO, "--address", address], tmp_path, ray_tmpdir)
    else:
        done = monoray(DEMO, tmp_path, ray_tmpdir, RAY_ADDRESS=address)
    line = assert_one_line_exit_2(done, f"{how} {address}", "Connection refused", "ray start")
    assert line.startswith("monoray sweep: error: ")
    assert_nothing_created(tmp_path)


@pytest.mark.timeout(180)
def test_sweep_to_a_port_that_is_not_ray_gives_up_after_the_bound(tmp_path, ray_tmpdir) -> None:
    """TCP accepts but nothing speaks GCS: ray.init is cut off at the bound, its retry warnings
    ("Failed to connect to GCS ... within 5 seconds") stay out of the terminal."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        done = monoray([*DEMO, "--address", address], tmp_path, ray_tmpdir)
    line = assert_one_line_exit_2(done, address, "did not connect within 5 s", TIMEOUT_ENV)
    log = Path(line.split("Ray's log: ")[1].split(")")[0])
    try:
        assert log.is_file()
    finally:
        log.unlink(missing_ok=True)
    assert_nothing_created(tmp_path)


@pytest.mark.timeout(180)
def test_auto_with_only_a_dead_recorded_cluster_fails_in_one_line(tmp_path, ray_tmpdir) -> None:
    done = monoray([*DEMO, "--address", "auto"], tmp_path, ray_tmpdir)
    assert_one_line_exit_2(done, "--address auto", "no cluster recorded", "ray start --head")
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    done = monoray([*DEMO, "--address", "auto"], tmp_path, ray_tmpdir)
    assert_one_line_exit_2(done, "--address auto", "127.0.0.1:1", "Connection refused")
    assert_nothing_created(tmp_path)


@pytest.mark.timeout(120)
def test_a_bad_timeout_or_address_is_one_line(tmp_path, ray_tmpdir) -> None:
    done = monoray([*DEMO, "--address", "127.0.0.1:1"], tmp_path, ray_tmpdir, **{TIMEOUT_ENV: "0"})
    assert_one_line_exit_2(done, f"{TIMEOUT_ENV}='0'", "positive")
    # The job server's URL (what jobs/submit.sh takes) is not an address to join.
    done = monoray(DEMO, tmp_path, ray_tmpdir, RAY_ADDRESS="http://127.0.0.1:8265")
    assert_one_line_exit_2(done, "RAY_ADDRESS http://127.0.0.1:8265", "expected HOST:PORT")
    assert_nothing_created(tmp_path)


@pytest.fixture(scope="module")
def digits_embeddings(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "digits"
    spec = EncoderSpec("vit-ti16", "random-init", image_size=16, device="cpu")
    extract(
        ExtractConfig(
            encoder=spec, images="digits", out=out, batch_size=512, loader_workers=0, progress=False
        )
    )
    return out


@pytest.mark.timeout(240)
def test_finetune_workers_to_an_unused_port_fails_in_one_line(
    tmp_path, ray_tmpdir, digits_embeddings
) -> None:
    address = f"127.0.0.1:{free_port()}"
    work = tmp_path / "work"
    work.mkdir()
    args = ["finetune", "--backbone", "clip-vit-b32", "--random-init", "--images", "digits"]
    args += ["--embeddings", str(digits_embeddings), "--out", str(work / "run")]
    args += ["--image-size", "32", "--subset", "12", "--batch-size", "6", "--device", "cpu"]
    args += ["--epochs", "1", "--workers", "2", "--address", address]
    done = monoray(args, work, ray_tmpdir)
    assert_one_line_exit_2(done, f"--address {address}", "Connection refused")
    assert done.stderr.startswith("monoray finetune: error: ")
    assert_nothing_created(work)


@pytest.mark.timeout(240)
def test_train_workers_to_an_unused_port_fails_in_one_line(tmp_path, ray_tmpdir) -> None:
    address = f"127.0.0.1:{free_port()}"
    work = tmp_path / "work"
    work.mkdir()
    args = ["train", "--arch", "batchtopk", "--features", "digits", "--k", "4", "--d-sae", "32"]
    args += ["--epochs", "1", "--workers", "2", "--address", address, "--out", str(work / "run")]
    done = monoray(args, work, ray_tmpdir)
    assert_one_line_exit_2(done, f"--address {address}", "Connection refused")
    assert done.stderr.startswith("monoray train: error: ")
    assert_nothing_created(work)


@pytest.mark.timeout(240)
def test_extract_to_an_unused_port_fails_in_one_line(tmp_path, ray_tmpdir) -> None:
    address = f"127.0.0.1:{free_port()}"
    args = ["extract", "--encoder", "vit-ti16", "--random-init", "--images", "digits"]
    args += ["--image-size", "16", "--out", str(tmp_path / "features"), "--address", address]
    done = monoray(args, tmp_path, ray_tmpdir)
    assert_one_line_exit_2(done, f"--address {address}", "Connection refused")
    assert done.stderr.startswith("monoray extract: error: ")
    assert_nothing_created(tmp_path)


@pytest.mark.timeout(300)
def test_a_live_head_is_joined_by_address_and_by_auto(tmp_path, ray_tmpdir) -> None:
    """`ray start --head` (token auth on, as Ray starts it): `auto` finds it through the
    address it recorded; HOST:PORT reaches it with RAY_AUTH_MODE=token, and the head's
    refusal of a client with a wrong token is one line after the bound."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_tmpdir), "RAY_USAGE_STATS_ENABLED": "0"}
    gcs = free_port()
    ports = [f"--port={gcs}", f"--metrics-export-port={free_port()}"]
    ports += [f"--dashboard-agent-listen-port={free_port()}"]
    ports += [f"--dashboard-agent-grpc-port={free_port()}"]
    head = ["--num-cpus=3", "--include-dashboard=false", f"--temp-dir={ray_tmpdir / 'ray'}"]
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", *ports, *head],
        check=True,
        capture_output=True,
        env=env,
        timeout=180,
    )
    probe = (
        "import sys, ray; from monoray.runs.cluster import start_ray; start_ray(sys.argv[1]); "
        "print(int(ray.cluster_resources()['CPU']))"
    )
    for address, extra in (("auto", {}), (f"127.0.0.1:{gcs}", {"RAY_AUTH_MODE": "token"})):
        done = subprocess.run(
            [sys.executable, "-c", probe, address],
            env={**env, TIMEOUT_ENV: "60", **extra},
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
        assert done.returncode == 0, (address, done.stderr[-3000:])
        assert done.stdout.split() == ["3"], (address, done.stdout)
    # A wrong token is refused, in one line within the bound (whether Ray sends a token by
    # itself depends on ~/.ray/auth_token existing, so the test gives one explicitly). A
    # longer bound than BOUND_S: the refusal must reach Ray's log first, even under load.
    wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32, TIMEOUT_ENV: "30"}
    done = monoray([*DEMO, "--address", f"127.0.0.1:{gcs}"], tmp_path, ray_tmpdir, **wrong)
    line = assert_one_line_exit_2(done, f"127.0.0.1:{gcs}", "refused this client's token")
    Path(line.split("Ray's log: ")[1].split(")")[0]).unlink()
    assert_nothing_created(tmp_path)


def test_a_local_ray_that_does_not_start_is_one_line(tmp_path: Path) -> None:
    """Both start attempts fail (here: a value ray.init refuses): one InputError line."""
    code = (
        "from monoray.errors import InputError\n"
        "from monoray.runs.cluster import start_local_ray\n"
        "try:\n"
        "    start_local_ray(num_cpus=-1, include_dashboard=False)\n"
        "except InputError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("a local Ray cluster did not start"), out.stdout
    assert str(tmp_path) in lines[0]
