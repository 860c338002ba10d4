"""Runs end with their SAE artifact `<out>/sae/` (the final checkpoint's SAE, bit for bit, kept
through `--resume`); `monoray inspect` reads it (an older run without it: its checkpoint);
`monoray export` writes npz arrays whose plain-numpy encode/decode is the SAE's, reads MLflow
URIs, and refuses bad input with one line, exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monoray.cli import main
from monoray.data import load_features
from monoray.runs.checkpoint import CHECKPOINTS, load_checkpoint
from monoray.sae import ARCH_NAMES, build_sae, drop_unused
from monoray.sae.export import FORMATS
from monoray.sae.io import CFG_FILE, read_sae
from monoray.train.artifact import SAE_DIR
from monoray.train.config import TrainConfig

QUICK = ["--features", "digits", "--d-sae", "48", "--k", "4", "--batch-size", "128"]
QUICK += ["--lr", "3e-3", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_artifact_is_final_checkpoint(run: Path) -> None:
    """`run/sae/` holds exactly the SAE of the run's newest checkpoint."""
    ckpt = load_checkpoint(run / CHECKPOINTS, with_optimizer=False)
    assert ckpt is not None
    art = read_sae(run / SAE_DIR)
    cfg = TrainConfig.from_dict(drop_unused(ckpt.config))
    assert art.sae.cfg == cfg.sae and art.epoch == ckpt.epoch
    assert art.normalisation.applied == cfg.normalize and art.data == ckpt.data
    state = art.sae.state_dict()
    assert state.keys() == ckpt.model_state.keys()
    for key, value in ckpt.model_state.items():
        assert torch.equal(state[key], value), key


def val_inputs(n: int = 200) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(load_features("digits").val.features[:n]))


def test_train_writes_the_artifact_and_resume_keeps_it(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--arch", "batchtopk", *QUICK, "--out", str(out)]
    assert main([*argv, "--epochs", "1"]) == 0
    assert_artifact_is_final_checkpoint(out)
    record = json.loads((out / SAE_DIR / CFG_FILE).read_text())
    assert record["normalisation"] == {
        "applied": "unit",
        "features": "none",
        "encoder": "digits-pixels",
    }
    assert record["epoch"] == 1 and record["inference_threshold"] > 0
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    assert_artifact_is_final_checkpoint(out)
    assert read_sae(out / SAE_DIR).epoch == 2
    assert main([*argv, "--epochs", "2", "--resume"]) == 0  # nothing left to train
    assert_artifact_is_final_checkpoint(out)
    capsys.readouterr()


def test_inspect_reads_the_artifact_and_falls_back_to_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--arch", "topk", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    only_artifact, only_checkpoint = tmp_path / "artifact-only", tmp_path / "before-artifacts"
    shutil.copytree(out, only_artifact, ignore=shutil.ignore_patterns(CHECKPOINTS))
    shutil.copytree(out, only_checkpoint, ignore=shutil.ignore_patterns(SAE_DIR))
    tables = []
    for run in (out, only_artifact, only_artifact / SAE_DIR, only_checkpoint):
        png = tmp_path / "g.png"
        assert main(["inspect", str(run), "--latents", "1", "5", "--out", str(png)]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] == tables[2] == tables[3]
    assert "latent 5 " in tables[0] and "epoch 1)" in tables[0]
    (only_checkpoint / CHECKPOINTS).rename(tmp_path / "gone")
    assert main(["inspect", str(only_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "no SAE artifact (sae/) and no checkpoint" in err and err.count("\n") == 1


def numpy_encode_decode(arrays: dict[str, np.ndarray], spec: dict, x: np.ndarray):
    """The npz json's formulas in float64 numpy: a reference independent of torch."""
    pre = (x - arrays["b_dec"]) @ arrays["W_enc"] + arrays["b_enc"]
    if spec["architecture"] == "topk":
        keep = np.argsort(-pre, axis=1, kind="stable")[:, : spec["k"]]
        a = np.zeros_like(pre)
        np.put_along_axis(a, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    elif spec["architecture"] == "vanilla":
        a = np.maximum(pre, 0)
    else:
        a = np.where(pre > arrays["threshold"], pre, 0)
    return a, a @ arrays["W_dec"] + arrays["b_dec"]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_npz_export_encodes_and_decodes_as_the_sae(tmp_path, capsys, arch):
    out = tmp_path / "run"
    argv = ["train", "--arch", arch, *QUICK, "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    assert main(["export", str(out), "--format", "npz", "--out", str(tmp_path / "npz")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'npz'}/ ({arch} SAE" in printed and "unit L2 norm" in printed
    spec = json.loads((tmp_path / "npz" / "sae.json").read_text())
    with np.load(tmp_path / "npz" / "sae.npz", allow_pickle=False) as f:
        arrays = {k: f[k].astype(np.float64) for k in f.files}
    assert {k: list(v.shape) for k, v in arrays.items()} == spec["arrays"]
    art = read_sae(out / SAE_DIR)
    x = art.prepare(val_inputs())
    want_a = art.sae.encode(x).to_dense().double().numpy()
    want_x = art.sae.decode(art.sae.encode(x)).double().numpy()
    got_a, got_x = numpy_encode_decode(arrays, spec, x.double().numpy())
    assert (got_a > 0).sum() > 0
    np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)


def test_read_and_export_from_an_mlflow_uri(tmp_path, capsys, monkeypatch):
    work = tmp_path / "cwd"  # MLflow's default stores (./mlflow.db) must stay unused
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "run"
    assert main(["train", "--arch", "jumprelu", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(out / SAE_DIR), artifact_path="model/sae")
    client.set_terminated(run_id)
    want = read_sae(out / SAE_DIR).sae
    for source in (f"runs:/{run_id}/model/sae", f"runs:/{run_id}/model"):  # the one inside
        got = read_sae(source, tracking_uri=uri).sae
        for key, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), key
    client.create_registered_model("monoray-e")
    client.create_model_version("monoray-e", source=f"runs:/{run_id}/model", run_id=run_id)
    got = read_sae("models:/monoray-e/1", tracking_uri=uri).sae
    assert torch.equal(got.log_threshold, want.log_threshold)
    argv = ["export", "models:/monoray-e/1", "--tracking-uri", uri, "--format", "saelens"]
    assert main([*argv, "--out", str(tmp_path / "lens")]) == 0
    assert (tmp_path / "lens" / "sae_weights.safetensors").is_file()
    capsys.readouterr()
    client.log_artifacts(run_id, str(out / SAE_DIR), artifact_path="model/copy")
    bad = [
        (f"runs:/{run_id}/model", "2 SAE artifacts in it (copy, sae); name one"),
        ("runs:/0123456789abcdef/sae", "cannot download the SAE artifact"),
    ]
    for source, message in bad:
        code = main(
            [
                "export",
                source,
                "--tracking-uri",
                uri,
                "--format",
                "npz",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and list(work.iterdir()) == []


def exit_code(argv: list[str]) -> int:
    """`main`'s exit status, also where argparse exits (SystemExit) instead of returning."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def test_export_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MONORAY_HOME", str(tmp_path / "home"))
    sae = build_sae(TrainConfig.from_dict({"arch": "vanilla", "d_in": 4, "d_sae": 8}).sae)
    from monoray.sae.io import InputNormalisation, save_sae

    art = save_sae(sae, tmp_path / "sae", normalisation=InputNormalisation(applied="none"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    cases = [
        (["export", "nowhere", "--format", "npz", "--out", "o"], "nowhere: no such directory"),
        (["export", str(art), "--format", "onnx", "--out", "o"], "invalid choice: 'onnx'"),
        (["export", str(art), "--format", "saelens", "--out", str(busy)], "holds other files"),
        (["export", "runs:/abc/sae", "--format", "npz", "--out", "o"], "no MLflow records in"),
    ]
    for argv, message in cases:
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (busy / "mine.txt").read_text() == "keep" and sorted(busy.iterdir()) == [
        busy / "mine.txt"
    ]
    assert not (tmp_path / "o").exists() and not (tmp_path / "home").exists()
    assert main(["export", str(art), "--format", "saelens", "--out", "o"]) == 0
    assert "note:" not in capsys.readouterr().out  # trained on raw rows: nothing to scale
    assert main(["export", str(art), "--format", "saelens", "--out", "o"]) == 0  # again: replaced


@settings(max_examples=40)
@given(
    source=st.one_of(
        st.text(alphabet=string.ascii_letters + string.digits + "._,/:-", max_size=14),
        st.sampled_from(["runs:/", "runs:/x/sae", "models:/m/1", "mlflow-artifacts:/a", "."]),
    ),
    fmt=st.sampled_from(FORMATS),
)
def test_fuzzed_export_sources_exit_2_and_write_nothing(source, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        before = os.getcwd()
        os.chdir(work)
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                code = exit_code(["export", source, "--format", fmt, "--out", "out"])
        finally:
            os.chdir(before)
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), lines
        assert lines[0].startswith(("monoray export: error: ", "monoray: error: ")), lines
        assert list(work.iterdir()) == []
