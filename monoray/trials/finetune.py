"""`kind: finetune` trials: one finetuning run (`monoray.finetune.train_finetune`) per Tune trial.

With `resources.workers == 0` the trial trains in its own process; with
`workers >= 1` it runs `fit_distributed` (Ray Train workers), whose epochs
`TuneReportCallback` forwards to Tune.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ray import tune

from monoray.errors import InputError
from monoray.finetune.backbones import CACHE
from monoray.finetune.config import DATA_KEYS, FinetuneConfig
from monoray.finetune.data import open_finetune_data
from monoray.finetune.loop import train_finetune
from monoray.finetune.trial import fit_distributed
from monoray.trials import tune as trial
from monoray.trials.kind import Space, TrialKind, check_points

METRICS = ("accuracy", "top5", "monoscore_mean", "monoscore_mean_active", "purity_binary")


def _on_workers(space: Space) -> bool:
    return space.resources.workers >= 1


def space_data(space: Space) -> dict[str, Any]:
    """The finetune config keys a space's `data` section sets (images, embeddings, subset)."""
    return {
        "images": space.data.features,
        "embeddings": space.data.embeddings,
        "subset": space.data.subset,
    }


def check_finetune_space(space: Space) -> None:
    """Fail before anything starts: every extreme search point builds, and the data opens."""
    data = space_data(space)
    if space.data.val_features is not None:
        raise InputError(
            f"{space.path}: data.val_features: finetune spaces take their val split from "
            "data.features (digits split, CIFAR test split, ImageFolder val/)"
        )
    weights = space.fixed.get("weights")
    if isinstance(weights, str) and weights != CACHE and not Path(weights).is_absolute():
        raise InputError(
            f"{space.path}: fixed.weights: {weights} is relative; trials run in their own "
            "directories: give an absolute path (or --set fixed.weights=PATH) or 'cache'"
        )
    check_points(space, lambda params: FinetuneConfig.from_dict({**params, **data}))
    open_finetune_data(data["images"], data["embeddings"], subset=data["subset"])


def finetune_trial(
    config: dict[str, Any], *, data: dict[str, Any], group: trial.WorkerGroup
) -> None:
    """Tune function trainable of a `kind: finetune` space.

    `data` holds the space's data keys (images, embeddings, subset); with
    `group.workers == 0` the trial trains in its own process.
    """
    cfg = FinetuneConfig.from_dict({**trial.trial_params(config), **data})
    if group.workers >= 1:
        trial.run_on_workers(functools.partial(fit_distributed, cfg), group)
        return

    def fit(out_dir: Path, resume_from: Path | None, on_epoch: trial.OnEpoch) -> dict[str, Any]:
        return train_finetune(cfg, out_dir=out_dir, resume_from=resume_from, on_epoch=on_epoch)

    trial.run_in_process(fit, cfg.epochs)


def trainable(space: Space, _: None, storage: Path) -> Any:
    """The Tune trainable; `resources.cpu` / `gpu` are per Train worker when `workers >= 1`."""
    fn = tune.with_parameters(
        finetune_trial, data=space_data(space), group=trial.WorkerGroup.of(space, storage)
    )
    return trial.with_resources(fn, space, on_workers=_on_workers(space))


KIND = TrialKind(
    name="finetune",
    config=FinetuneConfig,
    config_keys=lambda: frozenset(FinetuneConfig.allowed_keys()) - frozenset(DATA_KEYS),
    metrics=METRICS,
    objectives=(("accuracy", "max"), ("monoscore_mean", "max")),
    data_keys=frozenset({"embeddings"}),
    preflight=check_finetune_space,
    trainable=trainable,
    demand=lambda space: trial.demand(space, on_workers=_on_workers(space)),
)
