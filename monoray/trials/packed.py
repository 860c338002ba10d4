"""Packed trials: P SAE trials (P Optuna trials, P MLflow runs) trained as ONE Tune trial.

`resources.pack: P` makes the searcher ask Optuna for P trials at once
(`monoray.sweep.search.MonorayOptunaSearch`); their parameters travel in the Tune config
under `PACK_KEY`, and `sae_pack_trial` trains them together with
`monoray.train.packed.train_pack`. Each member still reports on its own:

- each pack epoch is ONE Tune result: under `MEMBERS_KEY`, every member's epoch
  result by its Optuna trial number (`member_reports`), which the tracker logs
  to that member's MLflow run. `tune.report` waits for the driver to take the
  result, so one round trip per pack epoch, not per member epoch, is what lets a
  pack of small SAEs train instead of waiting on its reports;
- that result carries the pack checkpoint (`members/trial-NNNN/` holds every
  member's newest epoch checkpoint), so a retried pack (worker SIGKILL at any
  moment) resumes every unfinished member from its newest persisted epoch;
- the last result holds `OUTCOMES_KEY`, a JSON map from member number to its
  final metrics, its failure report, or its stop-epoch result with the verdict
  under `STOPPED_KEY`: the searcher tells Optuna and the tracker ends the MLflow
  runs from it, member by member (one diverged member is FAILED alone);
- under `scheduler: mo_asha` each member is judged on its own results
  (`monoray.trials.verdicts`; the scheduler marks a stopped member's result in
  the bundle): at its rung epochs the pack waits for the member's verdict and a
  stopped member stops alone (the others train on). A retried or resumed pack
  reports each restored member's epoch again (one result), so that the scheduler
  judges it there (or repeats its standing verdict) before it trains on; a
  member restored at its stop is not trained again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from ray import tune

from monoray.data import FeatureSplits
from monoray.runs.workers import epoch_report, reportable
from monoray.trials.restore import restored_metrics
from monoray.trials.tune import scratch_dir, trial_params
from monoray.trials.verdicts import STOPPED_KEY, MemberRungs

PACK_KEY = "_pack"
"""Config key of a packed Tune trial: its members, each `pack_member(number, params)`."""
MEMBERS_KEY = "pack_members"
"""Result key of a pack epoch: JSON `{number: that member's epoch result}` (`member_reports`)."""
OUTCOMES_KEY = "pack_outcomes"
"""Last result of a packed trial: JSON `{number: final metrics or failure report}`."""
MEMBERS = "members"
"""Subdirectory of a pack checkpoint holding one checkpoint directory per member."""


def member_dir(pack_checkpoint: Path, number: int) -> Path:
    """Where member `number`'s newest epoch checkpoint lives in a pack checkpoint."""
    return pack_checkpoint / MEMBERS / f"trial-{number:04d}"


def pack_member(number: int, params: dict[str, Any]) -> dict[str, Any]:
    """One member of a packed config: its Optuna trial number and searched parameters."""
    return {"number": number, "params": params}


def pack_members(config: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(Optuna trial number, full training parameters) of each member of a packed config."""
    fixed = trial_params(config)
    return [(int(m["number"]), {**fixed, **m["params"]}) for m in config.get(PACK_KEY, ())]


def member_reports(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each member's epoch result in a pack-epoch result ({} in any other result)."""
    raw = result.get(MEMBERS_KEY)
    return {int(k): v for k, v in json.loads(raw).items()} if isinstance(raw, str) else {}


def bundle(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The pack-epoch result of these member epoch results (its `epoch`: their newest)."""
    return {
        MEMBERS_KEY: json.dumps({str(n): r for n, r in reports.items()}),
        "epoch": max(int(r["epoch"]) for r in reports.values()),
    }


def member_outcomes(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each member's final result, from a packed trial's last result ({} if it has none)."""
    raw = result.get(OUTCOMES_KEY)
    return {int(k): v for k, v in json.loads(raw).items()} if isinstance(raw, str) else {}


def restore_pack(dest: Path, numbers: list[int]) -> dict[int, Path]:
    """Member number -> its intact checkpoint in the newest usable persisted pack checkpoint.

    A pack checkpoint with any member's checkpoint damaged is skipped for the
    previous one (as `monoray.trials.restore` does for single trials); {} on a
    first attempt or when none is intact.
    """
    from monoray.errors import InputError
    from monoray.runs.checkpoint import read_checkpoint_dir
    from monoray.trials.restore import older_checkpoints

    latest = tune.get_checkpoint()
    if latest is None:
        return {}
    for candidate in [latest, *older_checkpoints(latest)]:
        local = Path(candidate.to_directory(str(dest / PurePosixPath(candidate.path).name)))
        found = {n: member_dir(local, n) for n in numbers if member_dir(local, n).is_dir()}
        try:
            for path in found.values():
                read_checkpoint_dir(path)
        except InputError:
            continue
        return found
    return {}


def sae_pack_trial(
    config: dict[str, Any], splits: FeatureSplits, rungs: MemberRungs | None = None
) -> None:
    """Tune function trainable of a pack: train every member, report each member epoch;
    with `rungs`, stop each member its verdict stops (module doc)."""
    from monoray.runs.checkpoint import CHECKPOINTS, read_checkpoint_dir
    from monoray.train import TrainConfig
    from monoray.train.packed import EpochEnd, train_pack

    members = pack_members(config)
    numbers = [n for n, _ in members]
    cfgs = [TrainConfig.from_dict({**p, "d_in": splits.train.dim}) for _, p in members]
    work = scratch_dir()
    stage = work / "pack-checkpoint"
    (stage / MEMBERS).mkdir(parents=True)
    out_dirs = [work / "runs" / f"trial-{n:04d}" for n in numbers]
    judge = rungs.judge(tune.get_context().get_experiment_name()) if rungs else None
    stopped: dict[int, dict[str, Any]] = {}
    """Member -> its stop-epoch result with the verdict (its outcome)."""

    def judged(number: int, report: dict[str, Any]) -> bool:
        epochs = cfgs[numbers.index(number)].epochs
        why = judge.stop(number, report["epoch"], epochs) if judge else None
        if why is not None:
            stopped[number] = {**report, STOPPED_KEY: why}
        return why is not None

    resumed: dict[int, int] = {}
    again: dict[int, dict[str, Any]] = {}
    for n, src in restore_pack(work / "restored", numbers).items():
        epoch = read_checkpoint_dir(src, with_optimizer=False).epoch
        shutil.copytree(src, out_dirs[numbers.index(n)] / CHECKPOINTS / f"epoch-{epoch:04d}")
        shutil.copytree(src, member_dir(stage, n))
        resumed[n] = epoch
        if epoch < cfgs[numbers.index(n)].epochs:  # judged there again before it trains on
            again[n] = epoch_report(epoch, restored_metrics(src), None, epoch)
    if again:
        tune.report(bundle(again))
        for n, report in again.items():
            judged(n, report)
    train = [i for i, n in enumerate(numbers) if n not in stopped]

    def on_epoch(epoch: int, ends: list[EpochEnd]) -> set[int]:
        reports = {}
        for end in ends:
            number = numbers[train[end.member]]
            dest = member_dir(stage, number)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(end.checkpoint, dest)
            reports[number] = epoch_report(epoch, end.metrics, dest, resumed.get(number, 0))
        tune.report(bundle(reports), checkpoint=_checkpoint(stage))  # the stage: every member
        by_number = {numbers[train[e.member]]: e.member for e in ends}
        return {i for n, i in by_number.items() if judged(n, reports[n])}

    try:
        outcomes = train_pack(
            [cfgs[i] for i in train],
            splits,
            out_dirs=[out_dirs[i] for i in train],
            resume=bool(resumed),
            on_epoch=on_epoch,
            progress=False,
        )
        ended = dict(zip([numbers[i] for i in train], outcomes, strict=True))
        final = {
            str(n): stopped.get(n)
            or ended[n].failure
            or {k: v for k, v in (ended[n].metrics or {}).items() if reportable(v)}
            for n in numbers
        }
        # Members restored at their last epoch train nothing; the final checkpoint holds them.
        tune.report({OUTCOMES_KEY: json.dumps(final)}, checkpoint=_checkpoint(stage))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checkpoint(stage: Path) -> tune.Checkpoint:
    return tune.Checkpoint.from_directory(str(stage))
