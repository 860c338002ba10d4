"""Search-space schema: the shipped spaces load, every mistake is one clear line."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml

from monoray.errors import InputError
from monoray.sweep.space import load_space

SPACES = sorted(Path(__file__).parents[1].joinpath("search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_load(path: Path) -> None:
    space = load_space(path)
    assert space.objectives
    assert space.budget.num_samples >= 1
    if space.sampler.type == "grid":  # the paper's finetuning grid, λ = 0 included
        lam = next(p for p in space.search if p.name == "mono_coef")
        assert lam.choices == (0, 0.03, 0.05, 0.07, 0.1) and space.budget.num_samples == 5
    else:
        assert all(p.name != "mono_coef" or p.type == "loguniform" for p in space.search)


def test_demo_space_defaults() -> None:
    space = load_space(Path(__file__).parents[1] / "search_spaces" / "demo.yaml")
    assert space.name == "demo"
    assert space.metric_names == ["r2", "monoscore_mean"]
    assert space.modes == ["max", "max"]
    assert space.baseline.enabled
    assert space.budget.num_samples >= 8
    aux = next(p for p in space.search if p.name == "aux_coef")
    assert aux.when == (("arch", ("topk",)),)


def write(tmp_path: Path, doc: object, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


BASE = {
    "kind": "sae",
    "data": {"features": "digits"},
    "fixed": {"d_sae": 64, "epochs": 1},
    "search": {"mono_coef": {"type": "loguniform", "low": 1e-3, "high": 1.0}},
}


def mutate(**changes: object) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = doc
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"kind": "rl"}, "kind: expected one of sae, finetune"),
        ({"search__mono_coef__type": "gaussian"}, "search.mono_coef.type"),
        ({"search__mono_coef__low": 2.0}, "low < high"),
        ({"search__mono_coef__low": -1.0}, "search.mono_coef.low: expected a finite positive"),
        ({"search__mono_coef__high": "lots"}, "search.mono_coef.high: expected a number"),
        ({"search__mono_coef__choices": [1, 2]}, "no choices on a loguniform"),
        ({"search__k": {"type": "int", "low": 4.5, "high": 8}}, "integer low and high"),
        ({"search__arch": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"fixed__learning_rate": 0.1}, "fixed.learning_rate: unknown sae trial parameter"),
        ({"search__nope": {"type": "uniform", "low": 0, "high": 1}}, "search.nope: unknown"),
        ({"budget__num_samples": 0}, "budget.num_samples: expected an integer >= 1"),
        ({"budget__num_samples": True}, "budget.num_samples"),
        ({"resources__gpu": -1}, "resources.gpu: expected a number >= 0"),
        ({"resources__cpu": 0}, "resources.cpu"),
        ({"sampler__type": "cmaes"}, "sampler.type: expected one of"),
        ({"objectives": [{"metric": "accuracy"}]}, "objectives[0].metric"),
        ({"objectives": [{"metric": "r2", "mode": "up"}]}, "objectives[0].mode"),
        ({"constraints": ["dead_fraction < 0.2"]}, "constraints[0]"),
        ({"constraints": ["nonsense <= 0.2"]}, "constraints[0]: expected a metric"),
        ({"baseline": {"params": {"k": 3}}}, "baseline.params.k: unknown key"),
        ({"fixed__mono_coef": 0.1, "search": {}}, "baseline: expected false"),
        ({"name": "../escape"}, "name: expected letters"),
        (
            {
                "search__aux_coef": {
                    "type": "uniform",
                    "low": 0,
                    "high": 1,
                    "when": {"arch": "topk"},
                }
            },
            "when.arch: expected a searched parameter listed above it",
        ),
    ],
)
def test_bad_space_is_one_line_naming_file_and_key(
    tmp_path: Path, changes: dict, needle: str
) -> None:
    path = write(tmp_path, mutate(**changes))
    with pytest.raises(InputError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert needle in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_space(tmp_path / "absent.yaml")
    bad = write(tmp_path, "kind: sae\nsearch: [unclosed\n")
    with pytest.raises(InputError, match=r"not valid YAML at line \d"):
        load_space(bad)


def test_yaml_cannot_construct_python_objects(tmp_path: Path) -> None:
    evil = write(tmp_path, "kind: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_space(evil)


def test_overrides_apply_and_validate(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    space = load_space(path, ["budget.num_samples=3", "fixed.epochs=2", "sampler.type=nsga2"])
    assert space.budget.num_samples == 3
    assert space.fixed["epochs"] == 2
    assert space.sampler.type == "nsga2"
    assert "epochs" not in load_space(path, ["fixed.epochs=null"]).fixed
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        load_space(path, ["budget.num_samples"])
    with pytest.raises(InputError, match=r"budget\.max_concurrent"):
        load_space(path, ["budget.max_concurrent=-2"])


def test_relative_data_paths_resolve_against_the_space_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", mutate(data__features="feats.npz"))
    assert load_space(path).data.features == str((tmp_path / "sub" / "feats.npz").resolve())


def test_scientific_notation_strings_are_numbers(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE).replace("0.001", "1e-3")
    space = load_space(write(tmp_path, text))
    assert space.search[0].low == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sweep", "{tmp}/absent.yaml"], "search space file not found"),
        (["sweep", "{tmp}/bad.yaml"], "bad.yaml: bogus: unknown key"),
        (["sweep", "{tmp}/good.yaml", "--num-samples", "0"], "--num-samples"),
        (["sweep", "{tmp}/good.yaml", "--set", "budget.max_concurrent=0"], "budget.max_concurrent"),
        (["sweep", "{tmp}/good.yaml", "--resume", "--root", "{tmp}/runs"], "no sweep named"),
        (["pareto", "nothing", "--root", "{tmp}/runs"], "no sweeps in"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, args, needle) -> None:
    from monoray.cli import main

    write(tmp_path, mutate(bogus=1), "bad.yaml")
    write(tmp_path, BASE, "good.yaml")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err


GRID = {
    "sampler": {"type": "grid"},
    "search": {
        "mono_coef": {"type": "categorical", "choices": [0, 0.01]},
        "k": {"type": "categorical", "choices": [4, 8, 16]},
    },
    "budget": {"num_samples": 6},
}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (
            {"search__k": {"type": "int", "low": 4, "high": 16}},
            "search.k.type: expected categorical",
        ),
        ({"budget__num_samples": 5}, "budget.num_samples: expected 6, the number of grid points"),
        (
            {"search__mono_coef__when": {"k": [4]}},
            "search.mono_coef.when: expected no `when` with sampler.type grid",
        ),
    ],
)
def test_grid_space_errors(tmp_path: Path, changes: dict, needle: str) -> None:
    doc = {**mutate(), **yaml.safe_load(yaml.safe_dump(GRID))}
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    with pytest.raises(InputError, match=re.escape(needle)):
        load_space(write(tmp_path, doc))


def test_grid_enqueues_every_point_once_with_the_zero_point_as_baseline(tmp_path: Path) -> None:
    from monoray.sweep.search import BASELINE_ATTR, open_study, storage_for

    space = load_space(write(tmp_path, {**mutate(), **GRID}))
    storage = storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = open_study(space, "grid", storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.WAITING] * 6
    points = [(t.system_attrs["fixed_params"], t.user_attrs) for t in study.trials]
    # the file's order (safe_dump sorts keys: k, then mono_coef), first parameter slowest
    assert [p for p, _ in points] == [
        {"k": k, "mono_coef": lam} for k in (4, 8, 16) for lam in (0, 0.01)
    ]
    assert [bool(a.get(BASELINE_ATTR)) for _, a in points] == [True, False] * 3
    assert len(open_study(space, "grid", storage).trials) == 6  # reopening adds nothing
