"""The Pareto front of a sweep: table, plots, tags and registered SAEs.

Optuna decides which trials are non-dominated (`Study.best_trials`, feasible
ones only when the space has constraints); MLflow holds what a reviewer looks
at: `pareto/pareto.csv` (the front, plus the λ = 0 baseline when it is not on
it, each front trial's gain over its baseline as `delta_<objective>`), the
front as plotly HTML and PNG (the baseline marked; the PNG also at the artifact root), the
MonoScore profiles of the front, a `monoray.pareto` tag on each front trial, the parent's
summary (`monoray.sweep.summary`) and, in SAE sweeps, each front trial's activating samples
and its SAE as a logged model, registered as a version of `monoray-<sweep>` with the aliases
of `monoray.sweep.models`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from monoray.runs.workers import PROFILE_JSON
from monoray.sweep.models import log_sae_model, register_front
from monoray.sweep.search import BASELINE_ATTR
from monoray.sweep.summary import publish_summary
from monoray.sweep.tracking import PARETO_TAG, SweepRecords
from monoray.sweep.views import log_activations

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
FRONT_IMAGE = "pareto_front.png"
"""The front's plot at the parent run's artifact root: one click in the UI."""


TERMINAL_WIDTH = 120
"""Columns of the printed front table; `pareto.csv` has them all."""
HIDDEN_IN_TERMINAL = ("vs_baseline", "mlflow_run")
"""Columns the printed table leaves to `pareto.csv` (the runs open from the printed links)."""
EXTRA_METRICS = ("l0", "dead_fraction", "purity_binary")
"""Metrics of each front trial's MLflow run that the table shows beside the objectives."""


@dataclass(frozen=True, slots=True)
class ParetoReport:
    metrics: list[str]
    rows: list[dict[str, Any]]
    csv_path: Path
    html_path: Path
    png_path: Path
    registered_model: str

    def table(self, width: int | None = TERMINAL_WIDTH) -> str:
        """The front as aligned plain text: what `monoray sweep` and `monoray pareto` print.

        With a `width`, the columns that fit in it: objectives and gains over the baseline
        first, then parameters, then other metrics (`pareto.csv` has every column).
        """
        if not self.rows:
            return "(no completed trial: the Pareto front is empty)"
        cols = list(self.rows[0])
        if width is not None:
            cols = self._columns_within(width)
        cells = [[_fmt(row[c]) for c in cols] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(line.rstrip() for line in lines)

    def _columns_within(self, width: int) -> list[str]:
        gains = [f"delta_{m}" for m in self.metrics]
        first = ["trial", "front", *self.metrics, *gains, "baseline"]
        rest = [c for c in self.rows[0] if c not in first and c not in HIDDEN_IN_TERMINAL]
        ordered = first + sorted(rest, key=lambda c: c in EXTRA_METRICS)
        cols: list[str] = []
        used = -2
        for c in ordered:
            w = max(len(c), *(len(_fmt(row[c])) for row in self.rows)) + 2
            if used + w > width:
                break
            cols.append(c)
            used += w
        return cols


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Non-dominated completed trials (feasible ones, if constrained), in trial order."""
    return sorted(study.best_trials, key=lambda t: t.number)


def baselines(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed λ = 0 baseline trials, in trial order."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in done if t.user_attrs.get(BASELINE_ATTR)]


def matched_baseline(
    t: optuna.trial.FrozenTrial, bases: list[optuna.trial.FrozenTrial]
) -> optuna.trial.FrozenTrial | None:
    """The baseline with the trial's other parameters (a grid has one per point), else the first."""
    others = {k: v for k, v in t.params.items() if k != "mono_coef"}
    twins = [b for b in bases if {k: v for k, v in b.params.items() if k != "mono_coef"} == others]
    return (twins or bases or [None])[0]


def pareto_rows(
    trials: list[optuna.trial.FrozenTrial],
    metrics: list[str],
    client: MlflowClient,
    runs: dict,
    bases: list[optuna.trial.FrozenTrial],
) -> list[dict[str, Any]]:
    """One row per front trial, then each baseline that is not on the front (`front` false)."""
    numbers = {t.number for t in trials}
    rows = []
    for t in [*trials, *(b for b in bases if b.number not in numbers)]:
        row: dict[str, Any] = {"trial": t.number, "front": t.number in numbers}
        row.update({m: float(v) for m, v in zip(metrics, t.values, strict=True)})
        base = matched_baseline(t, bases)
        row["vs_baseline"] = "" if base is None else base.number
        for i, m in enumerate(metrics):
            row[f"delta_{m}"] = "" if base is None else float(t.values[i]) - float(base.values[i])
        run_id = runs.get(t.number)
        if run_id is not None:
            extra = client.get_run(run_id).data.metrics
            for key in EXTRA_METRICS:
                if key in extra and key not in row:
                    row[key] = extra[key]
        row.update(dict(sorted(t.params.items())))
        if t.user_attrs.get(BASELINE_ATTR):
            row["mono_coef"] = 0.0
        row["baseline"] = bool(t.user_attrs.get(BASELINE_ATTR))
        row["mlflow_run"] = run_id or ""
        rows.append(row)
    # Same columns for every row (conditional params may be missing in some).
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return [{c: row.get(c, "") for c in columns} for row in rows]


def publish_pareto(
    study: optuna.Study, records: SweepRecords, *, out_dir: Path, sweep: str
) -> ParetoReport:
    """Compute the front and record it everywhere (idempotent: safe to run again)."""
    metrics = list(study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    client = records.client
    best = front(study)
    rows = pareto_rows(best, metrics, client, records.runs, baselines(study))
    out_dir.mkdir(parents=True, exist_ok=True)

    csv_path = out_dir / "pareto.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["trial", *metrics])
        writer.writeheader()
        writer.writerows(rows)
    client.log_artifact(records.parent_run_id, str(csv_path), "pareto")

    html_path, png_path = out_dir / "pareto_front.html", out_dir / "pareto_front.png"
    if any(t.state == TrialState.COMPLETE for t in study.trials):
        fig = optuna.visualization.plot_pareto_front(study, target_names=metrics)
        for b in baselines(study):
            if len(b.values) > 1:
                fig.add_annotation(
                    x=b.values[0], y=b.values[1], text=f"λ = 0 baseline (trial {b.number})"
                )
        fig.write_html(str(html_path), include_plotlyjs="cdn")
        client.log_figure(records.parent_run_id, fig, "pareto/pareto_front.html")
        mpl = pareto_png(study, metrics, best)
        mpl.savefig(png_path, dpi=120)
        client.log_figure(records.parent_run_id, mpl, "pareto/pareto_front.png")
        client.log_figure(records.parent_run_id, mpl, FRONT_IMAGE)
        plt.close(mpl)

    for t in study.trials:
        if t.number in records.runs:
            on_front = any(b.number == t.number for b in best)
            client.set_tag(records.runs[t.number], PARETO_TAG, str(on_front).lower())
    profiles = {t.number: load_profile(client, records.runs.get(t.number)) for t in best}
    profiles = {n: p for n, p in profiles.items() if p}
    if profiles:
        fig = profile_plot(profiles)
        fig.savefig(out_dir / "pareto_profiles.png", dpi=120)
        client.log_figure(records.parent_run_id, fig, "pareto/monoscore_profiles.png")
        plt.close(fig)

    publish_summary(
        study,
        client,
        experiment_id=records.experiment_id,
        parent_run_id=records.parent_run_id,
        metrics=metrics,
        rows=rows,
        best=best,
        bases=baselines(study),
    )
    model_name = f"monoray-{sweep}"
    if sweep_kind(client, records.parent_run_id) == "sae":
        models = publish_front_saes(client, records, best)
        register_front(client, model_name, study, metrics, best, records.runs, models)
    return ParetoReport(metrics, rows, csv_path, html_path, png_path, model_name)


def sweep_kind(client: MlflowClient, parent_run_id: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        space = client.download_artifacts(parent_run_id, "space.json", tmp)
        return str(json.loads(Path(space).read_text())["kind"])


def publish_front_saes(
    client: MlflowClient, records: SweepRecords, best: list[optuna.trial.FrozenTrial]
) -> dict[int, str]:
    """Each front trial's SAE (from the checkpoint in its run) as a logged model, with its
    activating samples; returns trial number -> model id."""
    from monoray.data import DataSource, load_source
    from monoray.runs.checkpoint import load_checkpoint
    from monoray.train.artifact import sae_of_checkpoint

    data: dict[str, Any] = {}
    models = {}
    for t in best:
        run_id = records.runs.get(t.number)
        if run_id is None or not client.list_artifacts(run_id, "checkpoint"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "checkpoint", tmp)
            ckpt = load_checkpoint(Path(path), with_optimizer=False)
        if ckpt is None or ckpt.data is None:
            continue
        key = json.dumps(ckpt.data, sort_keys=True)
        if key not in data:
            data[key] = load_source(DataSource.from_dict(ckpt.data))
        art = sae_of_checkpoint(ckpt, data[key].header)
        models[t.number] = log_sae_model(client, records.experiment_id, run_id, art)
        log_activations(client, run_id, art, data[key].val)
    return models


def pareto_png(
    study: optuna.Study, metrics: list[str], best: list[optuna.trial.FrozenTrial]
) -> plt.Figure:
    """All completed trials, the front highlighted, the λ = 0 baseline marked."""
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [t.values[0] for t in done]
    ys = [t.values[1] if len(t.values) > 1 else 0.0 for t in done]
    ax.scatter(xs, ys, c="#b0b0b0", label="trials", zorder=1)
    fb = sorted(best, key=lambda t: t.values[0])
    ax.plot(
        [t.values[0] for t in fb],
        [t.values[1] if len(t.values) > 1 else 0.0 for t in fb],
        "o-",
        c="#d62728",
        label="Pareto front",
        zorder=2,
    )
    bases = [t for t in done if t.user_attrs.get(BASELINE_ATTR)]
    for t in bases:
        ax.scatter(
            [t.values[0]],
            [t.values[1]],
            marker="*",
            s=200,
            c="k",
            label=f"λ = 0 baseline (trial {t.number})",
            zorder=3,
        )
    if len(metrics) > 1:
        for t in fb:  # each front trial's gain over its baseline
            base = matched_baseline(t, bases)
            if base is not None and base.number != t.number:
                gains = [v - b for v, b in zip(t.values, base.values, strict=True)]
                text = ", ".join(f"Δ{m} {g:+.3g}" for m, g in zip(metrics, gains, strict=True))
                ax.annotate(
                    text,
                    (t.values[0], t.values[1]),
                    fontsize=6,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    ax.set_xlabel(metrics[0])
    ax.set_ylabel(metrics[1] if len(metrics) > 1 else "")
    ax.set_title(f"{study.study_name}: {len(done)} trials, {len(best)} on the front")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def load_profile(client: MlflowClient, run_id: str | None) -> list[float] | None:
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"checkpoint/{PROFILE_JSON}", tmp)
        except (MlflowException, OSError):
            return None
        values = json.loads(Path(path).read_text())
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def profile_plot(profiles: dict[int, list[float]]) -> plt.Figure:
    """Sorted per-latent MonoScore of each front trial (paper Fig. 26-28 style)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for number, values in sorted(profiles.items()):
        ordered = sorted(values, reverse=True)
        ax.plot(range(len(ordered)), ordered, label=f"trial {number}")
    ax.set_xlabel("latent rank")
    ax.set_ylabel("MonoScore")
    ax.set_title("MonoScore profiles of the Pareto front")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
