"""Diverging trials in real sweeps: FAILED once with the reason, never retried, no traceback;
a dry run with any failed trial fails with one line."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from monoray.cli import main
from monoray.sweep.paths import ProjectPaths
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.search import FAIL_ATTR
from monoray.sweep.space import load_space
from monoray.sweep.tracking import SweepRecords

pytestmark = pytest.mark.integration
DEMO = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"
SMALL = ["fixed.d_sae=64", "fixed.epochs=2", "fixed.batch_size=128", "budget.max_concurrent=2"]
BLOW_UP = "fixed.lr=1.0e+30"


def test_diverging_trials_with_monoloss_fail_once(ray_session, project: Path, capfd) -> None:
    """λ > 0 at lr 1e30: the latents turn inf, which MonoLoss' input check sees first."""
    sets = [*SMALL, BLOW_UP, "baseline.enabled=false", "budget.num_samples=3"]
    space = load_space(DEMO, [*sets, "budget.max_failures=2"])
    result = run_sweep(space, SweepOptions(name="blowup", progress=False))
    assert not result.interrupted and (result.n_complete, result.n_failed) == (0, 3)
    study = optuna.load_study(study_name="blowup", storage=ProjectPaths.resolve(project).optuna_url)
    for t in study.trials:
        assert t.params["mono_coef"] > 0
        assert t.state == TrialState.FAIL
        assert t.user_attrs[FAIL_ATTR].startswith("diverged: "), t.user_attrs
    # One attempt per trial: no error (which Tune would retry), a single reported result.
    trial_dirs = sorted((project / "ray" / "blowup").glob("sae_trial_*"))
    assert len(trial_dirs) == 3
    for d in trial_dirs:
        assert not (d / "error.txt").exists(), (d / "error.txt").read_text()
        assert len((d / "result.json").read_text().splitlines()) == 1
    records = SweepRecords.load(ProjectPaths.resolve(project).tracking_uri, "blowup")
    for run_id in records.runs.values():
        assert records.client.get_run(run_id).info.status == "FAILED"
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err


# λ > 0 diverging is in `make test` through test_diverging_trials_with_monoloss_fail_once
@pytest.mark.parametrize("lam", ["0", pytest.param("0.1", marks=pytest.mark.slow)])
def test_dry_run_fails_with_one_line_when_a_trial_diverges(
    ray_session, project: Path, capfd, lam: str
) -> None:
    """λ = 0 diverges as a NaN loss, λ > 0 through MonoLoss' input check: both fail the run."""
    sets = [BLOW_UP, "fixed.d_sae=64", "search.mono_coef=null", f"fixed.mono_coef={lam}"]
    sets.append("baseline.enabled=false")
    code = main(
        ["sweep", str(DEMO), "--dry-run", "--quiet", *[a for s in sets for a in ("--set", s)]]
    )
    out = capfd.readouterr()
    assert code == 2, out.out + out.err
    lines = [ln for ln in out.err.splitlines() if ln.startswith("monoray sweep: ")]
    assert len(lines) == 1, out.err
    assert lines[0].startswith("monoray sweep: error: dry run: a trial failed: diverged: ")
    assert "dry run passed" not in out.out
    assert "Traceback" not in out.out + out.err
