"""Packed trials (`resources.pack`) end to end: real local Ray, Optuna RDB, MLflow, digits.

Each member of a pack must stay a first-class trial: its own Optuna trial, MLflow run,
checkpoint and place (or not) on the front, exactly as if it had run alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from optuna.trial import FrozenTrial, TrialState
from ray.train.constants import CHECKPOINT_DIR_NAME as CHECKPOINT_DIR

from monoray.cli import main
from monoray.sweep.audit import audit_sweep
from monoray.sweep.runner import SweepOptions, run_sweep
from monoray.sweep.search import FAIL_ATTR, RAY_TRIAL_ATTR
from monoray.sweep.space import load_space
from monoray.sweep.tracking import PARETO_TAG
from monoray.trials.packed import MEMBERS_KEY, member_reports
from tests.test_bad_inputs import assert_refused, files_under, run_cli
from tests.test_faults import (
    Injector,
    audited,
    driver_cmd,
    fault_space,
    is_trial_worker,
    kill_driver_when,
    last_result,
    metric_values,
    n_finished,
    poll,
    resumed_to_the_end,
    sweep,
)
from tests.test_sweep_integration import DEMO, REPO, assert_consistent, small_space, study_of

pytestmark = pytest.mark.integration


def test_packed_demo_sweep_is_n_trials_runs_front_registry_and_clean_audit(
    ray_session, project: Path
) -> None:
    space = small_space("resources.pack=4", num_samples=6)
    result = run_sweep(space, SweepOptions(name="packed", progress=False))
    assert not result.interrupted
    assert result.n_complete == 6
    study = study_of(project, "packed")
    # 6 Optuna trials in 2 Tune trials: a pack of 4 and the last, smaller pack of 2.
    packs = sorted(
        [t.number for t in study.trials if t.user_attrs[RAY_TRIAL_ATTR] == ray_id]
        for ray_id in {t.user_attrs[RAY_TRIAL_ATTR] for t in study.trials}
    )
    assert sorted(map(len, packs)) == [2, 4]
    assert len({tuple(t.params.items()) for t in study.trials}) == 6  # six distinct points
    records = assert_consistent(project, "packed", 6, epochs=2)
    client = records.client
    for t in study.trials:  # each run holds its own params and its own model
        run = client.get_run(records.runs[t.number])
        assert run.data.params["k"] == str(t.params["k"])
        assert run.data.metrics["r2"] == pytest.approx(t.values[0], rel=1e-9)
    tagged = sorted(
        n
        for n, rid in records.runs.items()
        if client.get_run(rid).data.tags.get(PARETO_TAG) == "true"
    )
    assert result.pareto is not None
    assert tagged == sorted(row["trial"] for row in result.pareto.rows if row["front"])
    versions = client.search_model_versions("name = 'monoray-packed'")
    assert sorted(v.run_id for v in versions) == sorted(records.runs[n] for n in tagged)
    report = audit_sweep("packed")
    assert report.ok, report.problems
    assert (report.n_trials, report.n_runs, report.n_complete) == (6, 6, 6)
    assert report.n_checkpoints == 12  # every member: its MLflow copy and its Tune checkpoint
    for trial_dir in (project / "ray" / "packed").glob("sae_pack_trial_*"):
        results = [
            json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()
        ]
        assert_one_checkpoint_per_pack_epoch(results)


def assert_one_checkpoint_per_pack_epoch(results: list[dict]) -> None:
    """A pack reports each epoch once, every member's epoch result in it, with the pack
    checkpoint: one Tune result and one checkpoint per pack epoch."""
    epochs = [member_reports(r) for r in results if MEMBERS_KEY in r]
    assert epochs and all(r.get(CHECKPOINT_DIR) for r in results if MEMBERS_KEY in r)
    for i, reports in enumerate(epochs, start=1):
        assert {rep["epoch"] for rep in reports.values()} == {i}, (i, reports.keys())
    assert len(epochs[0]) in (2, 4)  # the pack's size: every member in every epoch


def constraints(trial: FrozenTrial) -> dict[str, float]:
    """The constraint values Optuna holds for a trial (`Trial.set_constraint`)."""
    found = {k: v for k, v in trial.system_attrs.items() if k.startswith("constraints")}
    assert found, trial.system_attrs
    return found


def test_a_packed_sweep_records_what_the_unpacked_sweep_records(ray_session, project: Path) -> None:
    """The reference: the same 4 trials (the baseline and TPE's random start-up points, so
    the same parameters whatever the order of the asks) as 4 Tune trials and as one pack.
    On CPU the engine's members are bit-identical to `train_sae` (tests/test_train_packed.py);
    the tolerance only allows float32 rounding of the reported values."""
    runs = {}
    for pack in (1, 4):
        name = f"ref-{pack}"
        run_sweep(small_space(f"resources.pack={pack}"), SweepOptions(name=name, progress=False))
        runs[pack] = {t.number: t for t in study_of(project, name).trials}
    assert sorted(runs[1]) == sorted(runs[4]) == [0, 1, 2, 3]
    for number, alone in runs[1].items():
        packed = runs[4][number]
        assert packed.params == alone.params
        assert packed.state == alone.state == TrialState.COMPLETE
        assert packed.values == pytest.approx(alone.values, rel=1e-6, abs=1e-9)
        assert constraints(packed) == pytest.approx(constraints(alone), rel=1e-6, abs=1e-9)


def test_a_diverging_member_fails_alone(ray_session, project: Path) -> None:
    space = small_space(
        "resources.pack=3",
        "fixed.lr=null",
        "search.lr={type: categorical, choices: [0.004, 1.0e+30]}",
        "baseline.params.lr=1.0e+30",
        num_samples=3,
    )
    result = run_sweep(space, SweepOptions(name="pdiverge", progress=False))
    assert not result.interrupted
    study = study_of(project, "pdiverge")
    assert len({t.user_attrs[RAY_TRIAL_ATTR] for t in study.trials}) == 1  # one pack
    states = {t.number: t.state for t in study.trials}
    assert states[0] == TrialState.FAIL  # the baseline, at lr 1e30
    assert study.trials[0].user_attrs[FAIL_ATTR].startswith("diverged: loss became NaN/inf")
    for t in study.trials:
        assert t.state == (TrialState.FAIL if t.params["lr"] > 1 else TrialState.COMPLETE)
    assert any(s == TrialState.COMPLETE for s in states.values())
    assert_consistent(project, "pdiverge", 3, epochs=2)
    report = audit_sweep("pdiverge")
    assert report.ok, report.problems


def member_epochs(trial_dir: Path) -> dict[int, int]:
    """Each member's newest epoch in the pack's `result.json` ({} before any)."""
    try:
        lines = (trial_dir / "result.json").read_text().splitlines()
    except FileNotFoundError:
        return {}
    epochs: dict[int, int] = {}
    for line in lines:
        with contextlib.suppress(ValueError):  # the last line may still be being written
            for number, report in member_reports(json.loads(line)).items():
                epochs[number] = max(epochs.get(number, 0), report["epoch"])
    return epochs


@pytest.mark.faults
def test_worker_sigkill_mid_epoch_resumes_every_member(ray_session, project: Path) -> None:
    """The pack's worker dies once every member has an epoch checkpoint and one still trains:
    the retry resumes each unfinished member from the pack checkpoint, nothing is lost."""
    epochs, budget = 4, 3
    space = fault_space(
        "resources.pack=3", "budget.max_concurrent=1", num_samples=budget, epochs=epochs
    )
    killed: dict[int, int] = {}  # member -> its newest recorded epoch when the worker died

    def kill_mid_pack(stop: threading.Event) -> None:
        def one() -> bool:
            for d in (project / "ray" / "pkill").glob("sae_pack_trial_*"):
                seen = member_epochs(d)
                r = last_result(d)
                if len(seen) < budget or min(seen.values()) >= epochs or r is None:
                    continue
                if not is_trial_worker(r["pid"]):
                    continue
                os.kill(r["pid"], signal.SIGKILL)
                killed.update(seen)
                return True
            return False

        poll(stop, one, "a pack with every member past epoch 1")

    with Injector(kill_mid_pack):
        sweep(space, "pkill")
    assert killed, "the pack's worker was never killed"
    report = audited(project, "pkill", budget)
    assert report.n_complete == budget
    unfinished = {n: e for n, e in killed.items() if e < epochs}
    assert unfinished
    for number, epoch in unfinished.items():
        resumed = metric_values(project, "pkill", number, "resumed_from_epoch")
        assert max(resumed) >= epoch, (number, epoch, resumed)


@pytest.mark.faults
def test_worker_sigkill_after_a_pack_epoch_resumes_every_member_from_one_checkpoint(
    ray_session, project: Path
) -> None:
    """A pack epoch is one Tune result carrying the pack checkpoint: a worker killed while
    it trains epoch e + 1 (its last result: epoch e) resumes EVERY member from one pack
    checkpoint, that of epoch e, or of e - 1 if the kill beat the save call by which Tune
    registers a result's checkpoint; the tracker keeps one record per epoch."""
    epochs, budget = 6, 8
    space = fault_space(
        f"resources.pack={budget}", "budget.max_concurrent=1", num_samples=budget, epochs=epochs
    )
    killed: dict[str, int] = {}

    # The driver writes results into Ray's session dir at once; the copy under `project`
    # is synced at experiment snapshots (after checkpoints), so it never shows the window.
    session = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    live = session / "session_latest" / "artifacts"

    def kill_mid_pack_epoch(stop: threading.Event) -> None:
        def one() -> bool:
            for d in live.glob("*/pmid/driver_artifacts/sae_pack_trial_*"):
                r = last_result(d)
                reports = member_reports(r or {})
                seen = {rep["epoch"] for rep in reports.values()}
                if r is None or len(reports) != budget or len(seen) != 1:
                    continue
                (epoch,) = seen
                if not 2 <= epoch < epochs or r.get(CHECKPOINT_DIR) is None:
                    continue
                if not is_trial_worker(r["pid"]):
                    continue
                os.kill(r["pid"], signal.SIGKILL)
                killed.update(epoch=epoch)
                return True
            return False

        poll(stop, one, "a pack past its epoch 2", every_s=0.002)

    with Injector(kill_mid_pack_epoch):
        sweep(space, "pmid")
    assert killed, "the pack's worker was never killed"
    report = audited(project, "pmid", budget)
    assert report.n_complete == budget
    records = assert_consistent(project, "pmid", budget, epochs=epochs)  # one record per epoch
    resumed = {max(metric_values(project, "pmid", n, "resumed_from_epoch")) for n in records.runs}
    assert len(resumed) == 1, resumed
    assert killed["epoch"] - 1 <= resumed.pop() <= killed["epoch"], killed


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("0", "resources.pack: expected an integer >= 1, got 0"),
        ("-3", "resources.pack: expected an integer >= 1, got -3"),
        ("2.5", "resources.pack: expected an integer >= 1, got 2.5"),
        ("true", "resources.pack: expected an integer >= 1, got True"),
        ("eight", "resources.pack: expected an integer >= 1, got 'eight'"),
        ("[4]", "resources.pack: expected an integer >= 1, got [4]"),
    ],
)
def test_bad_pack_values_are_one_line_exit_2(tmp_path: Path, value: str, needle: str) -> None:
    root = tmp_path / "root"
    code, err = run_cli(
        ["sweep", str(DEMO), "--root", str(root), "--quiet", "--set", f"resources.pack={value}"]
    )
    assert_refused(code, err, "sweep", needle)
    assert files_under(root) == []


def test_pack_with_train_workers_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    argv = ["sweep", str(DEMO), "--root", str(root), "--quiet", "--set", "resources.pack=4"]
    code, err = run_cli([*argv, "--set", "resources.workers=2"])
    assert_refused(code, err, "sweep", "1 with resources.workers >= 2")
    assert files_under(root) == []


def test_finetune_spaces_refuse_packs(tmp_path: Path) -> None:
    space = REPO / "search_spaces" / "finetune_resnet50_cifar10.yaml"
    code, err = run_cli(
        ["sweep", str(space), "--root", str(tmp_path), "--quiet", "--set", "resources.pack=2"]
    )
    assert_refused(code, err, "sweep", "1 for kind: finetune")


def test_dry_run_of_a_pack_says_how_packing_was_sized(ray_session, project: Path, capfd) -> None:
    """The dry run trains one pack of its 2 trials and reports packing in one line."""
    import torch

    sets = ["fixed.d_sae=64", "resources.pack=2"]
    code = main(
        ["sweep", str(DEMO), "--dry-run", "--quiet", *[a for s in sets for a in ("--set", s)]]
    )
    out = capfd.readouterr()
    assert code == 0, out.out + out.err
    lines = [ln for ln in out.out.splitlines() if ln.startswith("packing: ")]
    wanted = (
        "packing: resources.pack 2 fits: at most "
        if torch.cuda.is_available()
        else ("packing: not sized (no GPU)")
    )
    assert len(lines) == 1 and lines[0].startswith(wanted), out.out
    assert "dry run passed" in out.out


@pytest.mark.gpu
def test_pack_sizing_measures_the_gpu_and_refuses_a_pack_that_does_not_fit(
    tmp_path: Path,
) -> None:
    from monoray.errors import InputError
    from monoray.sweep.pack_fit import measure_pack_fit, pack_sizing
    from monoray.trials.sae import load_splits

    space = load_space(DEMO, ["fixed.d_sae=4096", "fixed.batch_size=1024", "resources.gpu=1"])
    splits = load_splits(space.data)
    fit = measure_pack_fit(space, splits)
    assert fit.per_member_bytes > 4096 * 54 * 4 * 4  # weights, grads and Adam's two moments
    assert fit.largest >= 2
    assert pack_sizing(replace(space, resources=replace(space.resources, pack=2)), splits)
    huge = replace(space, resources=replace(space.resources, pack=fit.largest + 1))
    with pytest.raises(InputError, match=r"resources.pack: \d+ does not fit: at most"):
        pack_sizing(huge, splits)


@pytest.mark.faults
@pytest.mark.slow  # two driver starts + the audit CLI: minutes on 2 CPUs (`make test-all`)
@pytest.mark.timeout(1200)
def test_driver_killed_mid_pack_then_resumed_finishes_exactly_n(tmp_path: Path) -> None:
    """The driver dies while both packs train; `--resume` ends with n trials, n runs, a clean
    audit (no member duplicated, lost or left RUNNING) and the Pareto front published."""
    root, name, budget, epochs = tmp_path / "runs", "pdriver", 4, 3
    cmd = [*driver_cmd(root, name, budget, epochs), "--set", "resources.pack=2"]

    def mid_pack() -> bool:
        dirs = list((root / "ray" / name).glob("sae_pack_trial_*"))
        return any(0 < min(member_epochs(d).values() or [epochs]) < epochs for d in dirs)

    kill_driver_when(cmd, tmp_path / "driver.log", mid_pack, "a pack mid-training")
    assert n_finished(root, name) < budget
    resumed_to_the_end(root, name, cmd, budget)
