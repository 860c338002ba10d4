"""What a user's terminal shows: progress, the Pareto table and two deep links; no library noise.

The sweep runs through the CLI as `make demo` runs it (`finished_demo` in conftest.py),
against a real local Ray, Optuna and MLflow; the numbers it prints are checked against
the study and the MLflow records.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st
from optuna.trial import TrialState

from monoray.sweep.links import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_URL, VIEW
from monoray.sweep.progress import nondominated
from monoray.sweep.search import storage_for
from monoray.sweep.tracking import SweepRecords, client_for
from tests.conftest import DEMO_SPACE, FinishedSweep

NOISE = (
    "Configuration for experiment",  # Tune's banner
    "View detailed results here",
    "tensorboard",
    "A new study created",  # Optuna
    "Using an existing study",
    "Creating initial MLflow database tables",  # MLflow / alembic
    "Updating database tables",
    "Token authentication is enabled",  # Ray
    "may be a performance bottleneck",  # Tune, on a loaded machine
    "Traceback",
)
SCREEN = (40, 120)
"""One screen: lines x columns."""
STATUS = re.compile(
    r"^sweep (\d+)/(\d+): (\d+) done, (\d+) failed(?:, (\d+) pruned)?, (\d+) running \| "
    r"\S+, ETA \S+ \| front (\d+): best r2 ([-\d.]+) \(#(\d+)\), "
    r"monoscore_mean ([-\d.]+) \(#(\d+)\)$"
)


def monoray(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monoray", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def links_in(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(experiment|parent run): (\S+)$", text, flags=re.MULTILINE))


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the session's demo sweep runs in the first test that asks for it
def test_sweep_shows_progress_the_front_and_two_links_on_one_screen(
    finished_demo: FinishedSweep,
) -> None:
    out, err = finished_demo.stdout, finished_demo.stderr
    for noise in NOISE:
        assert noise.lower() not in (out + err).lower(), (noise, out + err)
    lines = (out + err).splitlines()
    assert len(lines) <= SCREEN[0], out + err
    ours = [ln for ln in lines if str(finished_demo.root) not in ln]  # paths are the user's
    assert max(map(len, ours)) <= SCREEN[1], out + err

    study = optuna.load_study(
        study_name=finished_demo.name,
        storage=storage_for(f"sqlite:///{finished_demo.root / 'optuna.db'}"),
    )
    states = [t.state for t in study.trials]
    status = [m for ln in err.splitlines() if (m := STATUS.match(ln))]
    assert status, err  # not a terminal: plain status lines, the last one at the end
    final = status[-1].groups()
    assert final[:2] == ("4", "4")
    assert int(final[2]) == states.count(TrialState.COMPLETE)
    assert int(final[3]) == states.count(TrialState.FAIL)
    assert int(final[4] or 0) == states.count(TrialState.PRUNED)
    assert final[5] == "0"
    best = study.best_trials
    assert int(final[6]) == len(best)
    for (value, number), i in ((final[7:9], 0), (final[9:11], 1)):
        top = max(best, key=lambda t, i=i: t.values[i])
        assert (float(value), int(number)) == (round(top.values[i], 4), top.number)

    # The table: one row per front trial plus the baseline off it, no run ids (the links are).
    header = next(ln for ln in out.splitlines() if ln.startswith("trial "))
    assert header.split()[:4] == ["trial", "front", "r2", "monoscore_mean"]
    records = SweepRecords.load(f"sqlite:///{finished_demo.root / 'mlflow.db'}", finished_demo.name)
    assert all(run_id not in out for run_id in records.runs.values())

    links = links_in(out)
    assert links == {
        "experiment": f"{UI_URL}/#/experiments/{records.experiment_id}{VIEW}",
        "parent run": f"{UI_URL}/#/experiments/{records.experiment_id}/runs/"
        f"{records.parent_run_id}{VIEW}",
    }
    experiment = records.client.get_experiment(records.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_pareto_prints_the_same_links_quietly(finished_demo: FinishedSweep) -> None:
    done = monoray("pareto", finished_demo.name, "--root", str(finished_demo.root))
    assert done.returncode == 0, done.stderr
    assert links_in(done.stdout) == links_in(finished_demo.stdout)
    assert len(links_in(done.stdout)) == 2
    for noise in NOISE:
        assert noise.lower() not in (done.stdout + done.stderr).lower(), noise


@pytest.mark.integration
def test_verbose_brings_the_libraries_output_back(tmp_path) -> None:
    """`--verbose` leaves Ray, Tune and Optuna at their defaults (a dry run: 2 x 1 epoch),
    also when started from a quiet monoray process (whose quieting its children inherit)."""
    from monoray.runs import verbosity

    quiet_parent = {k: v for k, v in os.environ.items() if k != verbosity.VERBOSE_ENV}
    quiet_parent |= {**verbosity.QUIET_ENV, verbosity.QUIETED_ENV: ",".join(verbosity.QUIET_ENV)}
    done = monoray(
        "sweep",
        str(DEMO_SPACE),
        "--dry-run",
        "--verbose",
        "--root",
        str(tmp_path),
        env=quiet_parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    both = done.stdout + done.stderr
    assert "Configuration for experiment" in both  # Tune
    assert "A new study created" in both  # Optuna
    assert "dry run passed" in done.stdout


@given(st.data())
def test_live_front_is_optunas_front(data: st.DataObject) -> None:
    """The progress display's front is `Study.best_trials` (ties and duplicates included)."""
    modes = data.draw(st.lists(st.sampled_from(["max", "min"]), min_size=1, max_size=3))
    value = st.sampled_from([0.0, 0.25, 0.5, 1.0])  # few values: ties and duplicates
    points = data.draw(
        st.lists(st.tuples(*[value] * len(modes)), min_size=1, max_size=12), label="points"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize" if m == "max" else "minimize" for m in modes]
    )
    for p in points:
        study.add_trial(optuna.trial.create_trial(values=list(p)))
    expected = sorted(t.number for t in study.best_trials)
    assert nondominated(dict(enumerate(points)), modes) == expected


def test_tracking_tags_experiments_as_model_training(tmp_path) -> None:
    """New experiments get MLflow's model-training kind; one made before it gets it on reopen."""
    from monoray.sweep.tracking import experiment_name, open_experiment

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = open_experiment(client, "fresh", tmp_path / "artifacts")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment(experiment_name("older"))
    assert open_experiment(client, "older", tmp_path / "artifacts") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
