"""Configs written once: one device check, one flag generator, one spelling per option."""

import dataclasses

import pytest

from monoray.cli import build_parser
from monoray.errors import InputError
from monoray.finetune.config import FinetuneConfig
from monoray.train.config import TrainConfig

FINETUNE = {"backbone": "resnet50", "embeddings": "e", "random_init": True}
SAE = {"arch": "topk", "d_in": 8, "d_sae": 16, "k": 2}


@pytest.mark.parametrize("device", ["mps", "cuda:x", "gpu"])
def test_device_check_is_the_same_for_every_config(device: str) -> None:
    # TrainConfig used to accept "mps" (undocumented) while FinetuneConfig refused it.
    errors = []
    for build in (
        lambda: TrainConfig.from_dict({**SAE, "device": device}),
        lambda: FinetuneConfig.from_dict({**FINETUNE, "device": device}),
    ):
        with pytest.raises(InputError) as err:
            build()
        errors.append(str(err.value))
    assert errors[0] == errors[1] == f"device must be auto, cpu, cuda or cuda:N, got {device!r}"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_devices_every_config_takes(device: str) -> None:
    assert TrainConfig.from_dict({**SAE, "device": device}).device == device
    assert FinetuneConfig.from_dict({**FINETUNE, "device": device}).device == device


def test_every_config_key_is_a_flag() -> None:
    train = build_parser(["train"]).parse_args(["train", "--out", "x", "--lr", "0.5"])
    assert train.lr == 0.5 and train.epochs is None  # unset flags leave the config's default
    for key in TrainConfig.allowed_keys():
        if key != "schema_version":
            assert hasattr(train, key), key
    ft = build_parser(["finetune"]).parse_args(["finetune", "--out", "x", "--random-init"])
    for key in FinetuneConfig.allowed_keys():
        assert hasattr(ft, key), key


@pytest.mark.parametrize("flag", ["--normalize", "--normalise"])
def test_extract_normalize_has_one_spelling_and_keeps_the_old(flag: str) -> None:
    args = build_parser(["extract"]).parse_args(
        [
            "extract",
            "--encoder",
            "vit-ti16",
            "--images",
            "digits",
            "--out",
            "x",
            "--random-init",
            flag,
            "none",
        ]
    )
    assert args.normalize == "none"


def test_one_seed_per_run() -> None:
    # It used to be two fields, SAEConfig.seed always overwritten by TrainConfig.seed.
    assert "seed" not in {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_dict({**SAE, "seed": "7"})
    assert cfg.seed == cfg.sae.seed == 7
    assert list(cfg.to_dict()).count("seed") == 1
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({**SAE, "epochs": True}, "epochs must be int, got True"),
        ({**SAE, "k": True}, "k must be int, got True"),
        ({**SAE, "lr": float("inf"), "epochs": float("inf")}, "epochs must be int, got inf"),
        ({**SAE, "kk": 3}, "unknown config key 'kk' (did you mean 'k'?)"),
    ],
)
def test_one_coercer_for_every_config(flat: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        TrainConfig.from_dict(flat)
    assert str(err.value) == message
