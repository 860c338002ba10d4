"""The reconstruction loss option (`recon_loss`): the reference's choice per architecture,
its value against a float64 hand formula, AuxK's normalisation and its gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monoray.errors import InputError
from monoray.sae import ARCH_NAMES, SAEConfig, build_sae, config_from_dict, config_to_dict
from monoray.sae.base import recon_loss
from monoray.train.config import TrainConfig

D_IN, D_SAE, K, B = 10, 40, 4, 24
REFERENCE = {
    "topk": "normalized_mse",
    "batchtopk": "mse",
    "jumprelu": "mse",
    "vanilla": "mse",
    "matryoshka": "mse",
}
"""The paper's reference code (spec §6): only TopK trains on the per-sample normalised MSE."""


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_loss(recon: np.ndarray, target: np.ndarray, kind: str) -> float:
    """float64 loop over samples: the spec's formula, written out."""
    errors = []
    for r, t in zip(recon.astype(np.float64), target.astype(np.float64), strict=True):
        err = float(np.mean((r - t) ** 2))
        energy = float(np.mean(t**2))
        errors.append(err / energy if kind == "normalized_mse" and energy > 0 else err)
    if kind == "mse":
        return float(np.mean((recon.astype(np.float64) - target.astype(np.float64)) ** 2))
    return float(np.mean(errors))


def inputs(seed: int = 0, *, scale_rows: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D_IN, generator=gen, dtype=torch.float64)
    if scale_rows:  # rows of very different energy: normalised and plain MSE disagree
        x = x * torch.logspace(-1, 1, B, dtype=torch.float64)[:, None]
    return x


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_default_is_the_references_choice_per_architecture(arch: str) -> None:
    assert SAEConfig(arch=arch, d_in=D_IN).recon_loss == REFERENCE[arch]
    cfg = TrainConfig.from_dict({"arch": arch, "d_in": D_IN})
    assert cfg.sae.recon_loss == REFERENCE[arch]
    assert cfg.to_dict()["recon_loss"] == REFERENCE[arch]  # recorded resolved, not None
    other = "mse" if REFERENCE[arch] == "normalized_mse" else "normalized_mse"
    assert SAEConfig(arch=arch, d_in=D_IN, recon_loss=other).recon_loss == other  # type: ignore[arg-type]


def test_option_round_trips_and_rejects_unknown_values() -> None:
    cfg = SAEConfig(arch="batchtopk", d_in=D_IN, recon_loss="normalized_mse")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(InputError, match="recon_loss must be one of mse, normalized_mse"):
        SAEConfig(arch="topk", d_in=D_IN, recon_loss="l2")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["mse", "normalized_mse"])
def test_loss_matches_float64_hand_formula(kind: str) -> None:
    x = inputs()
    recon = x + 0.3 * inputs(seed=1, scale_rows=False)
    x[3] = 0.0  # a zero row: no relative error, it counts its plain error
    got = float(recon_loss(recon, x, kind))  # type: ignore[arg-type]
    assert got == pytest.approx(hand_loss(recon.numpy(), x.numpy(), kind), rel=1e-12)


def test_normalized_mse_of_unit_rows_is_d_times_mse() -> None:
    # why the paper's TopK λ is ~d times its BatchTopK λ on unit-normalised features
    x = inputs()
    x = x / x.norm(dim=1, keepdim=True)
    recon = x + 0.1 * inputs(seed=2, scale_rows=False)
    plain, normed = recon_loss(recon, x, "mse"), recon_loss(recon, x, "normalized_mse")
    assert float(normed) == pytest.approx(D_IN * float(plain), rel=1e-12)


@pytest.mark.parametrize("kind", ["mse", "normalized_mse"])
def test_gradient_matches_finite_differences(kind: str) -> None:
    x = inputs().requires_grad_()
    recon = (x.detach() + 0.2 * inputs(seed=3, scale_rows=False)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, t: recon_loss(r, t, kind),  # type: ignore[arg-type]
        (recon, x),
        eps=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_training_loss_uses_the_architectures_recon_loss(arch: str, impl: str) -> None:
    sae = build_sae(
        SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, impl=impl, seed=1)  # type: ignore[arg-type]
    ).double()
    x = inputs()
    out = sae.forward_train(x)
    recon = out.recon.detach().numpy()
    if arch == "matryoshka":  # summed over prefixes; the last prefix is the whole model
        assert float(out.loss.prefix_mse[-1].detach()) == pytest.approx(
            hand_loss(recon, x.numpy(), REFERENCE[arch]), rel=1e-10
        )
    else:
        assert float(out.loss.mse.detach()) == pytest.approx(
            hand_loss(recon, x.numpy(), REFERENCE[arch]), rel=1e-10
        )


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_auxk_uses_the_same_normalisation_as_its_architecture(arch: str) -> None:
    for kind in ("mse", "normalized_mse"):
        cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, aux_k=3, recon_loss=kind, seed=1)  # type: ignore[arg-type]
        sae = build_sae(cfg).double()
        sae.steps_since_fired.fill_(cfg.dead_steps_threshold)  # every latent dead
        x = inputs()
        out = sae.forward_train(x)
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
            vals, idx = pre.topk(3, dim=1)
            acts = torch.zeros_like(pre).scatter(1, idx, vals.relu())
            aux_recon, residual = (acts @ sae.W_dec).numpy(), (x - out.recon).numpy()
        want = hand_loss(aux_recon, residual, kind)
        assert float(out.loss.aux.detach()) == pytest.approx(want, rel=1e-10)
