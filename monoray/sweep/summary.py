"""The parent run as the sweep's summary: metrics that compare sweeps, a note, the front's image.

Metrics on the parent (written again by every `publish_pareto`, each (key, step) once, so
`--resume` and `monoray pareto` never duplicate a step):

- `hypervolume`, step k: the hypervolume of the front of the first k completed trials (by
  completion time; feasible ones when the space has constraints), reference point 0 in
  both objectives (`HV_REFERENCE`, as in `docs/early_stopping.md`). Only for two
  maximised objectives (the default r2 vs monoscore_mean).
- at step n = finished trials: `trials_complete`, `trials_failed`, `trials_pruned`,
  `best_<objective>` (over the front) and `baseline_<objective>` (the first λ = 0 baseline).

The note (`mlflow.note.content`, the run's description in the UI) is the Pareto table in
markdown with each trial's gain over its baseline and links to the trials' runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from monoray.sweep.links import run_path

HV_REFERENCE = (0.0, 0.0)
"""Hypervolume reference point: (r2, monoscore_mean) = (0, 0), both maximised."""
HV_KEY = "hypervolume"
_CONSTRAINTS_ATTR = "constraints"
"""Where Optuna keeps a trial's constraint values (system attrs); <= 0 is feasible."""


def hypervolume_2d(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` (both objectives maximised) above the corner `ref`."""
    inside = sorted(((x, y) for x, y in points if x > ref[0] and y > ref[1]), reverse=True)
    area, top = 0.0, ref[1]
    for x, y in inside:  # by x descending: each point adds the strip above the best y so far
        if y > top:
            area += (x - ref[0]) * (y - top)
            top = y
    return area


def feasible(t: FrozenTrial) -> bool:
    return all(c <= 0 for c in t.system_attrs.get(_CONSTRAINTS_ATTR, ()))


def completed(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials in the order they finished (ties by number)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (t.datetime_complete or t.datetime_start, t.number))


def hypervolume_series(study: optuna.Study) -> list[float] | None:
    """The front's hypervolume after each completed trial; None unless 2 maximised objectives."""
    if list(study.directions) != [StudyDirection.MAXIMIZE] * 2:
        return None
    points: list[tuple[float, float]] = []
    series = []
    for t in completed(study):
        if feasible(t):
            points.append((float(t.values[0]), float(t.values[1])))
        series.append(hypervolume_2d(points, HV_REFERENCE))
    return series


def summary_metrics(
    study: optuna.Study, metrics: list[str], best: list[FrozenTrial], bases: list[FrozenTrial]
) -> dict[str, float]:
    """Counts of finished trials, the best value of each objective on the front, the baseline's."""
    states = [t.state for t in study.trials]
    out = {
        "trials_complete": float(states.count(TrialState.COMPLETE)),
        "trials_failed": float(states.count(TrialState.FAIL)),
        "trials_pruned": float(states.count(TrialState.PRUNED)),
    }
    for i, (m, d) in enumerate(zip(metrics, study.directions, strict=True)):
        pick = max if d == StudyDirection.MAXIMIZE else min
        if best:
            out[f"best_{m}"] = float(pick(t.values[i] for t in best))
        if bases:
            out[f"baseline_{m}"] = float(bases[0].values[i])
    return out


def log_new_steps(client: MlflowClient, run_id: str, series: dict[str, list[tuple[int, float]]]):
    """Log each (key, step, value) whose (key, step) the run does not have yet."""
    now = int(time.time() * 1000)
    new = []
    for key, points in series.items():
        have = {m.step for m in client.get_metric_history(run_id, key)}
        new += [Metric(key, value, now, step) for step, value in points if step not in have]
    for i in range(0, len(new), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=new[i : i + 1000])


def note(
    study: optuna.Study,
    metrics: list[str],
    rows: list[dict[str, Any]],
    experiment_id: str,
    hypervolume: float | None,
) -> str:
    """The parent run's description: counts, the hypervolume, the Pareto table with links."""
    states = [t.state for t in study.trials]
    lines = [
        f"**Sweep `{study.study_name}`**: {len(states)} trials, "
        f"{states.count(TrialState.COMPLETE)} complete, {states.count(TrialState.FAIL)} failed, "
        f"{states.count(TrialState.PRUNED)} stopped early.",
    ]
    if hypervolume is not None:
        ref = ", ".join(f"{m} = {r:g}" for m, r in zip(metrics, HV_REFERENCE, strict=True))
        lines.append(f"Hypervolume of the front: **{hypervolume:.4g}** (reference {ref}).")
    if not rows:
        return "\n\n".join([*lines, "No completed trial: the Pareto front is empty."])
    params = sorted({k for t in study.trials for k in t.params} | {"mono_coef"})
    header = ["trial", "role", *metrics, *(f"Δ {m}" for m in metrics), "vs baseline", *params]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        role = " + ".join(
            r for r, on in (("front", row["front"]), ("λ = 0 baseline", row["baseline"])) if on
        )
        name = f"trial-{row['trial']:04d}"
        link = (
            f"[{name}]({run_path(experiment_id, row['mlflow_run'])})" if row["mlflow_run"] else name
        )
        cells = [
            link,
            role,
            *(_cell(row[m]) for m in metrics),
            *(_cell(row[f"delta_{m}"], signed=True) for m in metrics),
            _cell(row["vs_baseline"]),
            *(_cell(row.get(p, "")) for p in params),
        ]
        table.append("| " + " | ".join(cells) + " |")
    lines += [
        "Pareto front (val), each trial's gain over its λ = 0 baseline (Δ); "
        "the plot is `pareto_front.png` in the artifacts.",
        "\n".join(table),
    ]
    return "\n\n".join(lines)


def _cell(value: Any, *, signed: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def publish_summary(
    study: optuna.Study,
    client: MlflowClient,
    *,
    experiment_id: str,
    parent_run_id: str,
    metrics: list[str],
    rows: list[dict[str, Any]],
    best: list[FrozenTrial],
    bases: list[FrozenTrial],
) -> None:
    hv = hypervolume_series(study)
    finished = sum(t.state.is_finished() for t in study.trials)
    series = {k: [(finished, v)] for k, v in summary_metrics(study, metrics, best, bases).items()}
    if hv:
        series[HV_KEY] = list(enumerate(hv, start=1))
    log_new_steps(client, parent_run_id, series)
    text = note(study, metrics, rows, experiment_id, hv[-1] if hv else None)
    client.set_tag(parent_run_id, MLFLOW_RUN_NOTE, text)
