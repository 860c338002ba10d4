"""What a trial run shows a reviewer besides numbers: its dataset, its MonoScore profile and
(front trials) its activating samples.

All of it is made in the driver from what reaches it anyway: the splits it loaded (the
dataset inputs) and the trial's checkpoint as Tune persisted it (the profile), never a
worker's local files, so it works the same on a cluster.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from monoray.data import FeatureSplit, FeatureSplits
from monoray.runs.workers import PROFILE_JSON

if TYPE_CHECKING:
    from monoray.sae.io import SAEArtifact

PROFILE_IMAGE = "monoscore_profile.png"
"""The val MonoScore profile at a trial run's artifact root."""
ACTIVATIONS_IMAGE = "activations.png"
ACTIVATIONS_TEXT = "activations.txt"
"""A front trial's top / middle / bottom activating samples (`monoray inspect`)."""
_DIGEST_ROWS = 4096
"""Rows of features hashed into a dataset's digest (all ids and the shape always are)."""


def split_digest(split: FeatureSplit) -> str:
    """A short fingerprint of a split: its shape, every sample id and the first rows."""
    h = hashlib.sha256(json.dumps(list(split.features.shape)).encode())
    h.update(np.ascontiguousarray(split.ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(split.features[:_DIGEST_ROWS], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def dataset_inputs(splits: FeatureSplits) -> list[DatasetInput]:
    """The train and val splits as MLflow datasets (source, digest, sizes), one input each."""
    source = splits.source.features if splits.source is not None else splits.header.encoder
    header = splits.header
    inputs = []
    for context, split in (("training", splits.train), ("validation", splits.val)):
        profile = {
            "rows": len(split),
            "dim": int(split.features.shape[1]),
            "labels": split.labels is not None,
            "images": split.images is not None,
            "encoder": header.encoder,
            "normalisation": header.normalisation,
        }
        dataset = Dataset(
            name=f"{Path(source).name or source}/{context}",
            digest=split_digest(split),
            source_type="local",
            source=json.dumps({"uri": source}),
            schema=json.dumps({"features": ["float32", [-1, profile["dim"]]]}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def log_profile(client: MlflowClient, run_id: str, checkpoint_dir: Path) -> None:
    """The checkpoint's val MonoScore profile as a plot at the run's artifact root."""
    from monoray.plots import plot_monoscore_profile

    path = checkpoint_dir / PROFILE_JSON
    if not path.is_file():
        return
    values = np.asarray(json.loads(path.read_text()), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size:
        client.log_figure(run_id, plot_monoscore_profile(values), PROFILE_IMAGE)


def log_activations(client: MlflowClient, run_id: str, art: SAEArtifact, val: FeatureSplit) -> None:
    """What `monoray inspect` shows of the run's SAE: top / middle / bottom activating val
    samples of 5 latents spread over the MonoScore ranking, as an image where the data
    has images, and always as text (sample ids, labels, activations)."""
    from monoray.errors import InputError
    from monoray.plots import plot_activation_grid
    from monoray.train.inspect_cli import grid_title, latent_panels, panels_text

    try:
        panels, _ = latent_panels(art, val, device="cpu", where="this SAE")
    except InputError as err:  # e.g. no latent fires: say so where the samples would be
        client.log_text(run_id, f"{err}\n", ACTIVATIONS_TEXT)
        return
    client.log_text(run_id, panels_text(panels) + "\n", ACTIVATIONS_TEXT)
    if val.images is not None:
        fig = plot_activation_grid(panels, title=grid_title(art))
        client.log_figure(run_id, fig, ACTIVATIONS_IMAGE)
