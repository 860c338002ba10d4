"""Each architecture reads only its own SAE keys; a key it would ignore is refused in one line.

Checkpoints written before the check (they may hold such a key) still load and resume.
"""

import json
from pathlib import Path

import pytest

from monoray.data import load_features
from monoray.errors import InputError
from monoray.runs.checkpoint import CHECKPOINTS, LATEST, load_checkpoint
from monoray.sae import ARCH_NAMES, ARCHITECTURES, SAEConfig, drop_unused, used_keys
from monoray.sweep.space import load_space
from monoray.train import TrainConfig, train_sae
from monoray.trials.kind import check_points

REPO = Path(__file__).resolve().parents[1]
# A non-default value of a key only some architectures read, per key.
IGNORABLE = {
    "k": 8,
    "aux_coef": 0.1,
    "aux_k": 16,
    "dead_steps_threshold": 7,
    "dead_reinit_steps": 3,
    "threshold_ema": 0.5,
    "matryoshka_prefixes": (4, 16),
    "l1_coef": 1e-3,
    "jumprelu_bandwidth": 1e-2,
    "jumprelu_sparsity_coef": 1e-2,
    "jumprelu_init_threshold": 1e-2,
}
BASE = {"d_in": 8, "d_sae": 16}


def test_every_field_is_common_or_read_by_some_architecture() -> None:
    fields = set(SAEConfig.__dataclass_fields__)
    assert fields == set().union(*(used_keys(a) for a in ARCH_NAMES))
    assert set(IGNORABLE) == fields - set.intersection(*(set(used_keys(a)) for a in ARCH_NAMES))
    assert set(ARCHITECTURES) == set(ARCH_NAMES)


def _flat(arch: str) -> dict[str, object]:
    return {"arch": arch, **BASE, **({"k": 2} if "k" in used_keys(arch) else {})}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_a_key_the_architecture_ignores_is_refused_in_one_line(arch: str) -> None:
    for key, value in IGNORABLE.items():
        flat = {**_flat(arch), key: value}
        if key in used_keys(arch):
            assert getattr(TrainConfig.from_dict(flat).sae, key) == value
            continue
        with pytest.raises(InputError) as err:
            TrainConfig.from_dict(flat)
        assert str(err.value) == f"{key}: the {arch} architecture does not use it (remove the key)"
        # At its default the key changes nothing and is accepted (every flat record holds it).
        default = SAEConfig.__dataclass_fields__[key].default
        TrainConfig.from_dict({**_flat(arch), key: default})


def test_space_setting_an_ignored_key_fails_preflight(tmp_path: Path) -> None:
    space = load_space(
        REPO / "search_spaces" / "demo.yaml",
        ["fixed.l1_coef=0.001"],  # vanilla's L1 term: neither BatchTopK nor TopK has one
    )
    with pytest.raises(InputError, match=r"demo.yaml: l1_coef: the batchtopk architecture"):
        check_points(space, lambda p: TrainConfig.from_dict({**p, "d_in": 64}))


@pytest.mark.timeout(300)
def test_old_checkpoint_with_an_ignored_key_resumes(tmp_path: Path) -> None:
    splits = load_features("digits").head(256)
    flat = {"arch": "vanilla", "d_in": splits.train.dim, "d_sae": 16, "batch_size": 64}
    flat |= {"device": "cpu", "epochs": 1}
    train_sae(TrainConfig.from_dict(flat), splits, out_dir=tmp_path, progress=False)
    # What the old code wrote for `--arch vanilla --k 8`: the key it ignored, in the record.
    root = tmp_path / CHECKPOINTS
    record_path = root / (root / LATEST).read_text().strip() / "checkpoint.json"
    record = json.loads(record_path.read_text())
    record["config"]["k"] = 8
    record_path.write_text(json.dumps(record))
    resumed = TrainConfig.from_dict({**flat, "epochs": 2})
    train_sae(resumed, splits, out_dir=tmp_path, resume=True, progress=False)
    ckpt = load_checkpoint(root, with_optimizer=False)
    assert ckpt is not None and ckpt.epoch == 2 and "k" not in drop_unused(ckpt.config)
