"""SAEConfig validation, dict round trip and the architecture registry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from monoray.errors import InputError
from monoray.sae import (
    ARCH_NAMES,
    ARCHITECTURES,
    SAEConfig,
    build_sae,
    config_from_dict,
    config_to_dict,
)


def test_defaults_follow_the_paper() -> None:
    cfg = SAEConfig(arch="batchtopk", d_in=768)
    assert (cfg.d_sae, cfg.k, cfg.mono_coef, cfg.l1_coef) == (8192, 64, 0.0, 1e-4)
    assert (cfg.jumprelu_bandwidth, cfg.jumprelu_sparsity_coef, cfg.aux_coef) == (
        1e-3,
        1e-3,
        1 / 32,
    )
    assert cfg.prefixes == (512, 2048, 8192)
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"k": 100, "d_sae": 64}, "k"),
        ({"d_in": 0}, "d_in"),
        ({"d_sae": -1}, "d_sae"),
        ({"mono_coef": -1e-4}, "mono_coef"),
        ({"l1_coef": -1.0}, "l1_coef"),
        ({"aux_coef": float("nan")}, "aux_coef"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"threshold_ema": 1.0}, "threshold_ema"),
        ({"arch": "relu"}, "arch"),
        ({"impl": "fast"}, "impl"),
        ({"k": 2.5}, "k"),
        ({"matryoshka_prefixes": (8, 4, 64), "d_sae": 64}, "matryoshka_prefixes"),
        ({"matryoshka_prefixes": (8, 32), "d_sae": 64}, "matryoshka_prefixes"),
        ({"schema_version": 99}, "schema_version"),
    ],
)
def test_invalid_values_name_the_field(changes: dict, field: str) -> None:
    kwargs = {"arch": "topk", "d_in": 16, "d_sae": 64, "k": 4, **changes}
    with pytest.raises(InputError, match=field):
        SAEConfig(**kwargs)


def test_k_only_binds_the_topk_family() -> None:
    assert SAEConfig(arch="vanilla", d_in=4, d_sae=8).k == 64  # k unused: no error
    with pytest.raises(InputError, match="k 64 is larger than d_sae 8"):
        SAEConfig(arch="matryoshka", d_in=4, d_sae=8)


def test_from_dict_rejects_unknown_key_with_the_closest_one() -> None:
    with pytest.raises(InputError, match=r"^unknown SAE config key 'kk' \(did you mean 'k'\?\)$"):
        config_from_dict({"arch": "topk", "d_in": 8, "kk": 3})
    with pytest.raises(InputError, match="d_in"):
        config_from_dict({"arch": "topk"})


def test_dict_round_trip_through_json_and_yaml_style_values() -> None:
    cfg = SAEConfig(arch="matryoshka", d_in=16, d_sae=64, k=4, matryoshka_prefixes=(8, 16, 64))
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg
    yaml_like = {"arch": "vanilla", "d_in": "16", "d_sae": 64.0, "l1_coef": "1e-4"}
    cfg = config_from_dict(yaml_like)
    assert (cfg.d_in, cfg.d_sae, cfg.l1_coef) == (16, 64, 1e-4)
    listed = SAEConfig(arch="matryoshka", d_in=4, d_sae=8, k=2, matryoshka_prefixes=[2, 8])  # type: ignore[arg-type]
    assert listed.matryoshka_prefixes == (2, 8)


def test_registry_builds_each_architecture() -> None:
    assert set(ARCHITECTURES) == set(ARCH_NAMES)
    for arch in ARCH_NAMES:
        sae = build_sae(SAEConfig(arch=arch, d_in=8, d_sae=32, k=4))
        assert type(sae) is ARCHITECTURES[arch]
        for tensor in sae.state_dict().values():
            assert tensor.dtype in (torch.float32, torch.int64)
