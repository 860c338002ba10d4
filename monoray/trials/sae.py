"""`kind: sae` trials: one SAE training run (`monoray.train.train_sae`) per Tune trial.

The feature splits come through `tune.with_parameters`, i.e. from Ray's object
store, put there once by the driver and shared zero-copy by every trial on a
node; with `resources.workers >= 2` each trial runs W Ray Train workers that
open the data themselves; with `resources.pack >= 2` each trial trains a pack
of SAE trials (`monoray.trials.packed`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ray import tune

from monoray.data import FeatureSplits, load_features
from monoray.train.config import TrainConfig
from monoray.train.evaluate import VAL_KEYS
from monoray.train.trainer import train_sae
from monoray.train.workers import check_workers, data_spec, fit_sae_workers
from monoray.trials import tune as trial
from monoray.trials.kind import Space, TrialKind, check_points
from monoray.trials.packed import sae_pack_trial
from monoray.trials.verdicts import MemberRungs


def _on_workers(space: Space) -> bool:
    return space.resources.workers >= 2


def load_splits(data: Any) -> FeatureSplits:
    splits = load_features(data.features, val_source=data.val_features, zero_rows=data.zero_rows)
    return splits if data.subset is None else splits.head(data.subset)


def check_trial_config(space: Space, splits: FeatureSplits) -> None:
    """Fail before anything starts if the fixed params plus any extreme point do not build."""
    dim = splits.train.dim
    workers = space.resources.workers

    def build(params: dict[str, Any]) -> TrainConfig:
        cfg = TrainConfig.from_dict({**params, "d_in": dim})
        if workers >= 2:
            where = f"data.features {space.data.features}"
            check_workers(
                cfg,
                len(splits.train),
                workers=workers,
                gpu_per_worker=space.resources.gpu,
                where=where,
            )
        return cfg

    check_points(space, build)


def preflight(space: Space) -> FeatureSplits:
    splits = load_splits(space.data)
    check_trial_config(space, splits)
    return splits


def sae_trial(config: dict[str, Any], splits: FeatureSplits) -> None:
    """Tune function trainable: train in the trial's process."""
    cfg = TrainConfig.from_dict({**trial.trial_params(config), "d_in": splits.train.dim})

    def fit(out_dir: Path, resume_from: Path | None, on_epoch: trial.OnEpoch) -> dict[str, Any]:
        return train_sae(
            cfg, splits, out_dir=out_dir, resume_from=resume_from, on_epoch=on_epoch, progress=False
        )

    trial.run_in_process(fit)


def sae_workers_trial(
    config: dict[str, Any], *, data: dict[str, Any], d_in: int, group: trial.WorkerGroup
) -> None:
    """Tune function trainable of a space with `resources.workers >= 2`."""
    cfg = TrainConfig.from_dict({**trial.trial_params(config), "d_in": d_in})
    trial.run_on_workers(functools.partial(fit_sae_workers, cfg, data), group)


def trainable(space: Space, splits: FeatureSplits, storage: Path) -> Any:
    """In process (splits from the object store), or on Train workers (`resources` per worker)."""
    if not _on_workers(space):
        if space.resources.pack == 1:
            fn = tune.with_parameters(sae_trial, splits=splits)
        else:
            rungs = MemberRungs.of(space.scheduler)
            fn = tune.with_parameters(sae_pack_trial, splits=splits, rungs=rungs)
        return trial.with_resources(fn, space, on_workers=False)
    d = space.data
    fn = tune.with_parameters(
        sae_workers_trial,
        data=data_spec(d.features, d.val_features, subset=d.subset),
        d_in=splits.train.dim,
        group=trial.WorkerGroup.of(space, storage),
    )
    return trial.with_resources(fn, space, on_workers=True)


KIND = TrialKind(
    name="sae",
    config=TrainConfig,
    config_keys=lambda: frozenset(TrainConfig.allowed_keys()),
    metrics=VAL_KEYS,
    objectives=(("r2", "max"), ("monoscore_mean", "max")),
    data_keys=frozenset({"zero_rows"}),
    preflight=preflight,
    trainable=trainable,
    demand=lambda space: trial.demand(space, on_workers=_on_workers(space)),
)
