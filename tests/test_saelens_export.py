"""`monoray export --format saelens` against the real `sae-lens` package (a dev dependency):
for every architecture, `sae_lens.SAE.load_from_disk` of the export encodes and decodes the
same (unit-normalised) digits rows as monoray's SAE, to float32 rounding."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import sae_lens
import torch

from monoray.cli import main
from monoray.data import load_features
from monoray.sae import ARCH_NAMES
from monoray.sae.export import SAELENS_ARCH
from monoray.train.artifact import SAE_DIR, open_run_sae

TRAIN = ["train", "--features", "digits", "--d-sae", "48", "--k", "4", "--batch-size", "128"]
TRAIN += ["--lr", "3e-3", "--device", "cpu", "--no-progress", "--epochs", "2"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_saelens_loads_the_export_and_matches(tmp_path, capsys, arch):
    run, lens = tmp_path / "run", tmp_path / "lens"
    assert main([*TRAIN, "--arch", arch, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "saelens", "--out", str(lens)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[1].startswith("note: scale each input row to unit L2")
    cfg = json.loads((lens / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[arch] and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["monoray_architecture"] == arch

    theirs = sae_lens.SAE.load_from_disk(str(lens), device="cpu")
    assert (
        type(theirs).__name__
        == {
            "topk": "TopKSAE",
            "standard": "StandardSAE",
            "jumprelu": "JumpReLUSAE",
        }[SAELENS_ARCH[arch]]
    )
    art = open_run_sae(run / SAE_DIR)
    ours = art.sae
    raw = torch.from_numpy(np.ascontiguousarray(load_features("digits").val.features))
    x = art.prepare(raw)
    want = ours.encode(x).to_dense()
    with torch.no_grad():
        got = theirs.encode(x)
        got_recon = theirs.decode(got)
        got_forward = theirs(x)
    assert int((want > 0).sum()) > len(x)  # latents fire: the comparison is not of zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got > 0, want > 0)  # the same latents fire
    want_recon = ours.decode(ours.encode(x))
    torch.testing.assert_close(got_recon, want_recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_forward, want_recon, rtol=1e-5, atol=1e-6)
