"""Security defaults: no code from data files, loopback servers, auth that refuses weak passwords.

- checkpoints load only as safetensors + JSON: a planted pickle is refused and never runs;
- search spaces, `--config` files and `--set` values cannot construct Python objects;
- `monoray ui` binds 127.0.0.1, needs `--auth` to bind anything else, and `--auth`
  refuses a missing, short or MLflow's old default admin password;
- a local Ray started by monoray has token auth on and its token file is private.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from monoray.cli import build_parser, main
from monoray.errors import InputError
from monoray.runs.checkpoint import load_checkpoint, read_checkpoint_dir, save_checkpoint
from monoray.runs.files import sha256_file
from monoray.sweep.space import load_space
from monoray.sweep.ui_cli import AUTH_INI, ui_command, write_auth_config

REPO = Path(__file__).parents[1]


class _Plant:
    """Unpickling this creates `path`: the proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return int(code or 0), err.getvalue()


def assert_refused(code: int, err: str, command: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"monoray {command}: error: ") and needle in lines[0], err


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a planted payload would write; the payload is checked to work on its own."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Plant(proof)))
    assert proof.exists(), "the payload must be live for the test to mean anything"
    return tmp_path / "pwned"


def _checkpoint(root: Path) -> Path:
    """A real one-epoch checkpoint of a tiny model, as the trainer writes it."""
    model = torch.nn.Linear(54, 3)
    config = {"arch": "topk", "d_in": 54, "d_sae": 3, "k": 1}  # digits' width
    return save_checkpoint(
        root / "checkpoints",
        epoch=1,
        step=1,
        config=config,
        model_state=model.state_dict(),
        optimizer_state=None,
        history=[{"r2": 0.5}],
    )


def _plant(ckpt: Path, fname: str, payload: bytes) -> None:
    """Write `payload` as `fname` and fix checkpoint.json's sha256: the attacker owns the dir."""
    (ckpt / fname).write_bytes(payload)
    record = json.loads((ckpt / "checkpoint.json").read_text())
    record["sha256"][fname] = sha256_file(ckpt / fname)
    (ckpt / "checkpoint.json").write_text(json.dumps(record))


def test_pickle_named_safetensors_is_refused_and_never_runs(tmp_path: Path, marker: Path) -> None:
    ckpt = _checkpoint(tmp_path / "run")
    _plant(ckpt, "model.safetensors", pickle.dumps({"weight": _Plant(marker)}))
    with pytest.raises(InputError, match=r"unreadable model\.safetensors") as info:
        read_checkpoint_dir(ckpt)
    assert "\n" not in str(info.value)
    # torch.save output is a zip of pickles: refused the same way.
    buffer = io.BytesIO()
    torch.save({"weight": _Plant(marker)}, buffer)
    _plant(ckpt, "model.safetensors", buffer.getvalue())
    with pytest.raises(InputError, match=r"unreadable model\.safetensors"):
        read_checkpoint_dir(ckpt)
    assert not marker.exists()


def test_checkpoint_of_pt_and_pkl_files_is_refused(tmp_path: Path, marker: Path) -> None:
    ckpt = _checkpoint(tmp_path / "run")
    (ckpt / "model.safetensors").unlink()
    for name in ("model.pt", "model.pkl", "model.bin"):
        _plant(ckpt, name, pickle.dumps(_Plant(marker)))
    record = json.loads((ckpt / "checkpoint.json").read_text())
    del record["sha256"]["model.safetensors"]
    (ckpt / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"no model\.safetensors"):
        read_checkpoint_dir(ckpt)
    with pytest.raises(InputError, match="no intact checkpoint"):
        load_checkpoint(tmp_path / "run")
    assert not marker.exists()


def test_resume_and_inspect_refuse_a_planted_checkpoint(tmp_path: Path, marker: Path) -> None:
    run = tmp_path / "run"
    ckpt = _checkpoint(run)
    _plant(ckpt, "model.safetensors", pickle.dumps(_Plant(marker)))
    code, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress"])
    assert_refused(code, err, "train", "no intact checkpoint")
    code, err = run_cli(["inspect", str(run)])
    assert_refused(code, err, "inspect", "no intact checkpoint")
    assert not marker.exists()


def test_checkpoint_json_cannot_smuggle_objects(tmp_path: Path, marker: Path) -> None:
    """JSON has no object hooks here: a pickle in a string stays a string and is refused."""
    run = tmp_path / "run"
    ckpt = _checkpoint(run)
    record = json.loads((ckpt / "checkpoint.json").read_text())
    smuggled = base64.b64encode(pickle.dumps(_Plant(marker))).decode()
    record["config"]["arch"] = {"py/reduce": [{"py/function": "builtins.open"}], "b64": smuggled}
    record["config"]["__class__"] = "os.system"
    (ckpt / "checkpoint.json").write_text(json.dumps(record))
    code, err = run_cli(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"])
    assert_refused(code, err, "train", "unknown config key '__class__'")
    assert not marker.exists()


PYTHON_TAGS = [
    "!!python/object/apply:builtins.open ['{marker}', 'w']",
    "!!python/object/new:builtins.open ['{marker}', 'w']",
    "!!python/name:os.system",
    "!!python/module:os",
]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_yaml_python_tags_are_refused_everywhere(tmp_path: Path, marker: Path, tag: str) -> None:
    value = tag.format(marker=marker)
    space = tmp_path / "space.yaml"
    space.write_text(f"kind: sae\nfixed:\n  epochs: {value}\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_space(space)
    good = tmp_path / "good.yaml"
    good.write_text("kind: sae\nfixed: {arch: topk}\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_space(good, [f"fixed.epochs={value}"])
    config = tmp_path / "cfg.yaml"
    config.write_text(f"arch: topk\nepochs: {value}\n")
    code, err = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "o")])
    assert_refused(code, err, "train", "not valid YAML/JSON")
    assert not marker.exists()


# --- servers ------------------------------------------------------------------------


def _ui_args(*argv: str):
    return build_parser(["ui", *argv]).parse_args(["ui", *argv])


def test_ui_binds_loopback_by_default(tmp_path: Path) -> None:
    cmd = ui_command(_ui_args("--root", str(tmp_path)))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--app-name" not in cmd
    with_auth = ui_command(_ui_args("--root", str(tmp_path), "--auth"))
    assert with_auth[with_auth.index("--app-name") + 1] == "basic-auth"


@pytest.fixture
def ui_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "runs"


def test_ui_refuses_to_expose_itself_without_auth(ui_env: Path) -> None:
    code, err = run_cli(["ui", "--root", str(ui_env), "--host", "0.0.0.0"])
    assert_refused(
        code, err, "ui", "--host 0.0.0.0: serving the UI beyond this machine needs --auth"
    )


@pytest.mark.parametrize(
    ("password", "needle"),
    [
        (None, "set MLFLOW_AUTH_ADMIN_PASSWORD to the admin password"),
        ("", "set MLFLOW_AUTH_ADMIN_PASSWORD to the admin password"),
        ("password1234", "refusing MLflow's old default admin password"),
        ("hunter2", "at least 12 characters"),
    ],
)
def test_ui_auth_refuses_missing_default_or_short_passwords(
    ui_env: Path, monkeypatch: pytest.MonkeyPatch, password: str | None, needle: str
) -> None:
    if password is not None:
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
    code, err = run_cli(["ui", "--root", str(ui_env), "--auth"])
    assert_refused(code, err, "ui", needle)


def test_ui_auth_reads_a_users_config_file(
    ui_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ini = tmp_path / "auth.ini"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    code, err = run_cli(["ui", "--root", str(ui_env), "--auth"])
    assert_refused(code, err, "ui", "MLFLOW_AUTH_CONFIG_PATH=")
    ini.write_text("[mlflow]\nadmin_username = admin\nadmin_password = password1234\n")
    code, err = run_cli(["ui", "--root", str(ui_env), "--auth", "--host", "0.0.0.0"])
    assert_refused(code, err, "ui", "old default admin password")


def test_monoray_auth_config_is_private_and_holds_no_password(tmp_path: Path) -> None:
    path = write_auth_config(tmp_path)
    assert path == tmp_path / AUTH_INI
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "admin_password" not in text
    assert f"sqlite:///{tmp_path / 'basic_auth.db'}" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, user: str | None = None, password: str = "") -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.integration
def test_ui_with_auth_serves_on_loopback_and_needs_the_password(tmp_path: Path) -> None:
    """The real `monoray ui --auth`: bound to 127.0.0.1 only, 401 without the password."""
    port, password = _free_port(), "a-long-test-password"
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    cmd = [sys.executable, "-m", "monoray", "ui", "--auth", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--root", str(tmp_path / "runs")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        deadline = time.monotonic() + 240  # MLflow's imports take long on a loaded 2-core box
        listening: set[str] = set()
        while not listening:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "monoray ui --auth never listened"
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(proc.pid)
                tree = [server, *server.children(recursive=True)]
                listening = {
                    c.laddr.ip
                    for p in tree
                    for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port
                }
            time.sleep(0.5)
        assert listening == {"127.0.0.1"}
        while _get(url) not in (200, 401):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert _get(url) == 401
        assert _get(url, "admin", "password1234") == 401
        assert _get(url, "admin", password) == 200
        assert (tmp_path / "runs" / "basic_auth.db").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# --- Ray ------------------------------------------------------------------------------


@pytest.mark.integration
def test_local_ray_has_token_auth_and_a_private_token(ray_session) -> None:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from monoray.runs.cluster import start_ray

    token = Path.home() / ".ray" / "auth_token"
    assert token.is_file(), "Ray wrote no token: token auth is off"
    token.chmod(0o644)  # as Ray writes it
    start_ray(None)  # what `monoray sweep` runs: the session's Ray is reused
    assert is_token_auth_enabled()
    assert token.stat().st_mode & 0o777 == 0o600


def test_submit_without_a_token_says_how_to_pass_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(tmp_path), "RAY_ADDRESS": "http://127.0.0.1:1"}
    done = subprocess.run(
        [str(REPO / "jobs" / "submit.sh"), "search_spaces/demo.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "no Ray token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
