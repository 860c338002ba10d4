"""The λ = 0 baseline is a matched pair: every searched value pinned to the space's nominal
one, and the Pareto output names the baseline and each front trial's gain over it."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
import yaml

from monoray.errors import InputError
from monoray.sweep.pareto import ParetoReport, baselines, front, pareto_rows
from monoray.sweep.search import BASELINE_ATTR, DefineByRun, build_sampler, open_study, storage_for
from monoray.sweep.space import load_space

SPACES = sorted(Path(__file__).parents[1].joinpath("search_spaces").glob("*.yaml"))
SEARCH = {
    "arch": {"type": "categorical", "choices": ["batchtopk", "topk"]},
    "k": {"type": "int", "low": 4, "high": 16},
    "mono_coef": {"type": "loguniform", "low": 1e-3, "high": 1.0},
    "aux_coef": {"type": "loguniform", "low": 1e-2, "high": 1e-1, "when": {"arch": "topk"}},
}


def write_space(tmp_path: Path, baseline: object, name: str = "space.yaml") -> Path:
    doc = {
        "kind": "sae",
        "data": {"features": "digits"},
        "fixed": {"d_sae": 32, "epochs": 1},
        "search": SEARCH,
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
        "baseline": baseline,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("baseline", "missing"),
    [
        (True, "arch"),
        ({"params": {"arch": "batchtopk"}}, "k"),
        ({"enabled": True, "params": {"arch": "topk", "k": 8}}, "aux_coef"),  # its `when` holds
    ],
)
def test_unpinned_baseline_key_is_refused_with_one_line(
    tmp_path: Path, baseline: object, missing: str
) -> None:
    path = write_space(tmp_path, baseline)
    with pytest.raises(InputError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: baseline.params.{missing}: missing")
    assert "baseline: {params:" in message  # names the key that fixes it


def test_cli_refuses_an_unpinned_baseline_with_exit_2(tmp_path: Path, capsys) -> None:
    from monoray.cli import main

    path = write_space(tmp_path, True)
    assert main(["sweep", str(path), "--dry-run", "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "baseline.params.arch: missing" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_baseline_may_not_pin_lambda(tmp_path: Path) -> None:
    path = write_space(tmp_path, {"params": {"arch": "batchtopk", "k": 8, "mono_coef": 0.01}})
    with pytest.raises(InputError, match=r"baseline.params.mono_coef: expected no value"):
        load_space(path)


def test_a_condition_that_does_not_hold_needs_no_pin(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, {"params": {"arch": "batchtopk", "k": 8}}))
    assert space.baseline.params == {"arch": "batchtopk", "k": 8}


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_baseline_pins_every_searched_key(path: Path) -> None:
    space = load_space(path)
    if not space.baseline.enabled or space.sampler.type == "grid":
        return
    point = {**space.baseline.params, "mono_coef": 0.0}
    for p in space.search:
        if all(point.get(o) in allowed for o, allowed in p.when):
            assert p.name in point, p.name
    if path.stem.split("_")[0] in ("topk", "batchtopk", "matryoshka"):
        assert space.baseline.params == {"k": 64}  # the paper's comparison


NOMINAL = {
    "topk": {"k": 64},
    "batchtopk": {"k": 64},
    "matryoshka": {"k": 64},
    "jumprelu": {"jumprelu_sparsity_coef": 1e-3},
    "vanilla": {"l1_coef": 1e-4},
}
"""The paper's App. B values of the keys the paper-scale spaces search besides λ."""
PAPER_SPACES = [p for p in SPACES if p.stem.split("_")[0] in NOMINAL]


@pytest.mark.parametrize("path", PAPER_SPACES, ids=[p.stem for p in PAPER_SPACES])
def test_shipped_baseline_trial_is_the_papers_nominal_point(tmp_path: Path, path: Path) -> None:
    space = load_space(path)
    storage = storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    open_study(space, "paper", storage)
    study = optuna.load_study(study_name="paper", storage=storage, sampler=build_sampler(space))
    trial = study.ask()
    assert DefineByRun(space.search)(trial) == {"mono_coef": 0.0}
    assert trial.params == NOMINAL[path.stem.split("_")[0]]


def test_baseline_trial_runs_at_the_nominal_values(tmp_path: Path) -> None:
    nominal = {"arch": "topk", "k": 11, "aux_coef": 0.05}
    space = load_space(write_space(tmp_path, {"params": nominal}))
    storage = storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    open_study(space, "pins", storage)
    study = optuna.load_study(study_name="pins", storage=storage, sampler=build_sampler(space))
    define = DefineByRun(space.search)
    trial = study.ask()
    assert trial.user_attrs.get(BASELINE_ATTR)
    assert define(trial) == {"mono_coef": 0.0}
    study.tell(trial, [0.5, 0.5])
    assert study.trials[0].params == nominal  # nothing of the baseline was sampled
    later = study.ask()
    define(later)
    assert "mono_coef" in later.params  # the trials after it search λ


def test_pareto_rows_mark_the_baseline_and_each_front_trials_gain(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, {"params": {"arch": "batchtopk", "k": 8}}))
    storage = storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    open_study(space, "gains", storage)
    study = optuna.load_study(study_name="gains", storage=storage, sampler=build_sampler(space))
    define = DefineByRun(space.search)
    # (r2, monoscore): the baseline (first) is dominated by trial 1, trial 2 trades off
    for values in ([0.70, 0.50], [0.72, 0.60], [0.60, 0.80]):
        trial = study.ask()
        define(trial)
        study.tell(trial, values)
    metrics = ["r2", "monoscore_mean"]
    best = front(study)
    assert [t.number for t in best] == [1, 2]
    rows = pareto_rows(best, metrics, None, {}, baselines(study))  # type: ignore[arg-type]
    by_trial = {row["trial"]: row for row in rows}
    assert sorted(by_trial) == [0, 1, 2]  # the baseline is listed though off the front
    assert by_trial[0]["baseline"] is True and by_trial[0]["front"] is False
    assert [by_trial[n]["baseline"] for n in (1, 2)] == [False, False]
    assert by_trial[1]["delta_r2"] == pytest.approx(0.02)
    assert by_trial[1]["delta_monoscore_mean"] == pytest.approx(0.10)
    assert by_trial[2]["delta_r2"] == pytest.approx(-0.10)
    assert by_trial[2]["delta_monoscore_mean"] == pytest.approx(0.30)
    assert {row["vs_baseline"] for row in rows} == {0}
    report = ParetoReport(
        metrics, rows, tmp_path / "p.csv", tmp_path / "p.html", tmp_path / "p.png", "m"
    )
    header, *lines = report.table(width=None).splitlines()
    assert {"baseline", "front", "vs_baseline", "delta_r2", "delta_monoscore_mean"} <= set(
        header.split()
    )
    assert len(lines) == 3
    # What the terminal shows: objectives, gains and the baseline first, within the width.
    header, *lines = report.table(width=70).splitlines()
    assert header.split() == ["trial", "front", *metrics, "delta_r2", "delta_monoscore_mean"]
    assert len(lines) == 3 and max(len(ln) for ln in [header, *lines]) <= 70


def test_grid_gains_are_over_the_matching_lambda_zero_point(tmp_path: Path) -> None:
    doc = {
        "kind": "sae",
        "data": {"features": "digits"},
        "fixed": {"d_sae": 32, "epochs": 1},
        "search": {
            "k": {"type": "categorical", "choices": [4, 8]},
            "mono_coef": {"type": "categorical", "choices": [0, 0.1]},
        },
        "sampler": {"type": "grid"},
        "budget": {"num_samples": 4},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    space = load_space(path)
    storage = storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    open_study(space, "grid", storage)
    study = optuna.load_study(study_name="grid", storage=storage, sampler=build_sampler(space))
    values = {(4, 0): [0.9, 0.1], (4, 0.1): [0.8, 0.5], (8, 0): [0.95, 0.2], (8, 0.1): [0.7, 0.9]}
    define = DefineByRun(space.search)
    for _ in range(4):
        trial = study.ask()
        define(trial)
        study.tell(trial, values[(trial.params["k"], trial.params.get("mono_coef", 0))])
    rows = pareto_rows(front(study), ["r2", "ms"], None, {}, baselines(study))  # type: ignore[arg-type]
    numbers = {t.number: (t.params["k"], t.params.get("mono_coef", 0)) for t in study.trials}
    for row in rows:
        twin = values[(row["k"], 0)]
        assert numbers[row["vs_baseline"]] == (row["k"], 0)  # the λ = 0 point of its k
        assert row["delta_r2"] == pytest.approx(row["r2"] - twin[0])
        assert row["delta_ms"] == pytest.approx(row["ms"] - twin[1])


@pytest.mark.integration
def test_pareto_csv_of_a_real_sweep_marks_the_baseline(ray_session, project: Path) -> None:
    from monoray.sweep.runner import SweepOptions, run_sweep

    demo = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"
    space = load_space(
        demo,
        [
            "fixed.d_sae=32",
            "fixed.epochs=1",
            "fixed.batch_size=256",
            "budget.num_samples=3",
            "budget.max_concurrent=2",
            "constraints=[]",
        ],
    )
    result = run_sweep(space, SweepOptions(progress=False, name="baseline-gains"))
    assert result.pareto is not None
    study = optuna.load_study(study_name="baseline-gains", storage=result.storage_url)
    base = study.trials[0]
    assert base.user_attrs.get(BASELINE_ATTR) and base.params == {"arch": "batchtopk", "k": 8}
    with result.pareto.csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    marked = [r for r in rows if r["baseline"] == "True"]
    assert [int(r["trial"]) for r in marked] == [0]
    by_number = {t.number: t for t in study.trials}
    for row in rows:
        t = by_number[int(row["trial"])]
        assert row["vs_baseline"] == "0"
        assert float(row["delta_r2"]) == pytest.approx(t.values[0] - base.values[0])
        assert float(row["delta_monoscore_mean"]) == pytest.approx(t.values[1] - base.values[1])
