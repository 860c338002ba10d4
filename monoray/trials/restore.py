"""Restore a retried Tune trial from its newest *intact* persisted checkpoint.

`tune.get_checkpoint()` hands a retried trial the latest checkpoint Tune
persisted, whatever its state on disk. A file damaged after it was written
(bad sector, a partial copy on shared storage) would then fail the retry, and
every retry after it. Tune keeps the trial's previous checkpoints
(`CheckpointConfig(num_to_keep=2)`) as `checkpoint_NNNNNN` siblings in the
trial's storage directory; here each candidate is verified against the sha256
recorded in its `checkpoint.json`, newest first, and the first intact one is
used. With none intact the trial starts again from scratch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath

import pyarrow.fs
from ray import tune

from monoray.errors import InputError
from monoray.runs.checkpoint import read_checkpoint_dir

log = logging.getLogger(__name__)

_TUNE_CHECKPOINT = re.compile(r"^checkpoint_(\d{6,})$")


def older_checkpoints(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The trial's persisted checkpoints older than `checkpoint`, newest first."""
    path = PurePosixPath(checkpoint.path)
    current = _TUNE_CHECKPOINT.match(path.name)
    if current is None:
        return []
    selector = pyarrow.fs.FileSelector(str(path.parent), allow_not_found=True)
    found = []
    for info in checkpoint.filesystem.get_file_info(selector):
        m = _TUNE_CHECKPOINT.match(PurePosixPath(info.path).name)
        if m and info.type == pyarrow.fs.FileType.Directory and int(m[1]) < int(current[1]):
            found.append((int(m[1]), info.path))
    return [
        tune.Checkpoint(path=p, filesystem=checkpoint.filesystem) for _, p in sorted(found)[::-1]
    ]


def restore_checkpoint(dest: Path) -> tuple[Path | None, int]:
    """Copy this trial's newest intact checkpoint under `dest`: (local dir, its epoch).

    (None, 0) on a first attempt, or when no persisted checkpoint is intact.
    """
    latest = tune.get_checkpoint()
    if latest is None:
        return None, 0
    damaged: list[str] = []
    for candidate in [latest, *older_checkpoints(latest)]:
        local = Path(candidate.to_directory(str(dest / PurePosixPath(candidate.path).name)))
        try:
            epoch = read_checkpoint_dir(local).epoch
        except InputError as err:
            damaged.append(str(err))
            continue
        if damaged:
            log.warning(
                "resuming from %s (epoch %d): newer checkpoint damaged: %s",
                candidate.path,
                epoch,
                "; ".join(damaged),
            )
        return local, epoch
    log.warning("no intact checkpoint to resume from, starting again: %s", "; ".join(damaged))
    return None, 0
