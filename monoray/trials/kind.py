"""`TrialKind`: everything the sweep needs to know about one kind of trial.

A kind module (`monoray/trials/sae.py`, `finetune.py`, ...) builds one `TrialKind`;
`monoray/trials/__init__.py` lists them. The space loader, the runner, the MO-ASHA
scheduler and the Tune trial go through this record only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from monoray.errors import InputError


class Space(Protocol):
    """What a kind reads of a sweep space (`monoray.sweep.space.SweepSpace`, a layer above)."""

    @property
    def path(self) -> Path: ...
    @property
    def fixed(self) -> dict[str, Any]: ...
    @property
    def data(self) -> Any: ...
    @property
    def resources(self) -> Any: ...
    @property
    def budget(self) -> Any: ...
    @property
    def scheduler(self) -> Any: ...
    def extreme_points(self) -> Iterator[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class TrialKind:
    name: str
    """`kind:` in a space file."""
    config: type
    """The trial's flat config dataclass (its field defaults are the space's defaults)."""
    config_keys: Callable[[], frozenset[str]]
    """Names a space's `fixed` and `search` may set."""
    metrics: tuple[str, ...]
    """What a trial reports every epoch; objectives and constraints name these."""
    objectives: tuple[tuple[str, str], ...]
    """(metric, mode) of the objectives when a space gives none."""
    data_keys: frozenset[str]
    """`data` keys beyond features / val_features / subset that the kind takes."""
    preflight: Callable[[Space], Any]
    """Fails before Ray starts (every extreme search point builds, the data opens); its
    return value (e.g. the loaded splits) goes to `trainable`."""
    trainable: Callable[[Space, Any, Path], Any]
    """`(space, preflight's value, storage of Train runs)` -> the Tune trainable with resources."""
    demand: Callable[[Space], tuple[float, float]]
    """(CPUs, GPUs) one trial occupies."""


def check_points(space: Space, build: Callable[[dict[str, Any]], object]) -> None:
    """`build(fixed + point)` for every extreme point of the space (see `extreme_points`)."""
    for point in space.extreme_points():
        try:
            build({**space.fixed, **point})
        except InputError as err:
            at = f" (at search point {point})" if point else ""
            raise InputError(f"{space.path}: {err}{at}") from None
