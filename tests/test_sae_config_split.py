"""`SAEConfig` splits into a model and a loss view, and each architecture reads exactly the
keys its model fields and loss terms declare (which is what makes refusing the others safe).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from monoray.data import load_features
from monoray.sae import (
    ARCH_NAMES,
    ARCHITECTURES,
    SAEConfig,
    SAELossConfig,
    SAEModelConfig,
    build_sae,
    used_keys,
)
from monoray.sae.config import IMPLS, MODEL_KEYS, RECON_LOSSES, RECORD_KEYS
from monoray.sae.terms import LOSS_KEYS, TERMS

FIELDS = frozenset(f.name for f in dataclasses.fields(SAEConfig))
# Per field: another valid value than BASE's (or the default) that changes what an
# architecture reading it computes within STEPS training steps on digits.
OTHER: dict[str, Any] = {
    "d_sae": 40,
    "k": 6,
    "mono_coef": 0.5,
    "mono_eps": 50.0,
    "mono_precision": "float64",
    "l1_coef": 1e-1,
    "jumprelu_bandwidth": 0.2,
    "jumprelu_sparsity_coef": 0.5,
    "jumprelu_init_threshold": 0.05,
    "aux_k": 1,
    "aux_coef": 0.5,
    "dead_steps_threshold": 3,
    "dead_reinit_steps": 0,
    "threshold_ema": 0.5,
    "matryoshka_prefixes": (8, 32),
    "recon_loss": "mse",
    "impl": "dense",
    "seed": 7,
}
NOT_VARIED = frozenset({"arch", "d_in"}) | RECORD_KEYS
# Small windows so AuxK, re-initialisation and the threshold EMA act within STEPS steps.
BASE = {"d_sae": 32, "k": 4, "mono_coef": 1e-2, "dead_steps_threshold": 1}
BASE |= {"dead_reinit_steps": 2, "recon_loss": "normalized_mse", "impl": "sparse"}
STEPS, BATCH = 6, 32


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy(load_features("digits").train.features[: STEPS * BATCH].copy())


def test_views_partition_the_fields_and_terms_own_the_loss_keys() -> None:
    model = {f.name for f in dataclasses.fields(SAEModelConfig)}
    loss = {f.name for f in dataclasses.fields(SAELossConfig)}
    assert model == MODEL_KEYS and loss == LOSS_KEYS
    assert not model & loss and model | loss | RECORD_KEYS == FIELDS
    owned = [key for term in TERMS for key in term.keys]
    assert len(owned) == len(set(owned)) == len(LOSS_KEYS)  # each loss key has one term
    assert len({t.name for t in TERMS}) == len(TERMS)
    assert set(OTHER) == FIELDS - NOT_VARIED


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_architecture_keys_are_its_model_keys_and_its_terms_keys(arch: str) -> None:
    cls = ARCHITECTURES[arch]
    assert cls.MODEL_KEYS <= MODEL_KEYS
    assert set(cls.TERMS) <= set(TERMS) and len(set(cls.TERMS)) == len(cls.TERMS)
    terms = {key for term in cls.TERMS for key in term.keys}
    assert used_keys(arch) == RECORD_KEYS | cls.MODEL_KEYS | terms


@st.composite
def configs(draw: st.DrawFn) -> SAEConfig:
    arch = draw(st.sampled_from(ARCH_NAMES))
    d_sae = draw(st.integers(1, 256))
    cuts = draw(st.sets(st.integers(1, d_sae - 1), max_size=4)) if d_sae > 1 else set()
    prefixes = draw(st.none() | st.just((*sorted(cuts), d_sae)))
    coef = st.floats(0, 10, allow_nan=False)
    positive = st.floats(1e-6, 10, allow_nan=False)
    return SAEConfig(
        arch=arch,
        d_in=draw(st.integers(1, 64)),
        d_sae=d_sae,
        k=draw(st.integers(1, d_sae)),
        mono_coef=draw(coef),
        mono_eps=draw(positive),
        mono_precision=draw(st.sampled_from(("float32", "float64"))),
        l1_coef=draw(coef),
        jumprelu_bandwidth=draw(positive),
        jumprelu_sparsity_coef=draw(coef),
        jumprelu_init_threshold=draw(positive),
        aux_k=draw(st.integers(1, 1024)),
        aux_coef=draw(coef),
        dead_steps_threshold=draw(st.integers(1, 1000)),
        dead_reinit_steps=draw(st.integers(0, 1000)),
        threshold_ema=draw(st.floats(0, 0.999)),
        matryoshka_prefixes=prefixes,
        recon_loss=draw(st.none() | st.sampled_from(RECON_LOSSES)),
        impl=draw(st.sampled_from(IMPLS)),
        seed=draw(st.integers(0, 2**31)),
    )


@given(configs())
def test_model_and_loss_views_rebuild_the_flat_record(cfg: SAEConfig) -> None:
    model, loss = cfg.model, cfg.loss
    assert SAEConfig.from_parts(model, loss) == cfg
    assert model.prefixes == cfg.prefixes
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.d_sae = 1  # type: ignore[misc]


def _trace(cfg: SAEConfig, x: torch.Tensor) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """Every output of STEPS training steps, then evaluation, and the final state."""
    sae = build_sae(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    trace: list[Any] = []
    for batch in x.split(BATCH):
        out = sae.forward_train(batch)
        coefs = (out.loss.sparsity_coef, out.loss.aux_coef, out.loss.mono_coef)
        trace.append((out.path, out.recon.detach(), out.latents.to_dense().detach(), coefs))
        trace.append(out.loss.metrics())
        opt.zero_grad()
        out.loss.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step(opt)
    trace.append(sae.encode(x).to_dense())
    trace.append(sae(x))
    return trace, sae.state_dict()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_an_architecture_reads_exactly_its_keys(arch: str, digits: torch.Tensor) -> None:
    torch.set_num_threads(1)
    base = SAEConfig(arch=arch, d_in=digits.shape[1], **BASE)  # type: ignore[arg-type]
    reference = _trace(base, digits)
    assert _same(reference, _trace(base, digits))  # deterministic, so equality means something
    for key, value in OTHER.items():
        other = dataclasses.replace(base, **{key: value})
        same = _same(reference, _trace(other, digits))
        # An ignored key changes nothing (so refusing it loses nothing); a read one matters.
        assert same == (key not in used_keys(arch)), f"{arch}: {key}={value!r}"
