"""Helpers shared by the flat, frozen run configs (`TrainConfig`, `FinetuneConfig`)."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from monoray.errors import InputError


def reject_unknown_keys(d: Iterable[Any], allowed: Sequence[str], what: str) -> None:
    """One `InputError` for the first key not in `allowed`, with the closest match as a hint."""
    for key in d:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"unknown {what} key {key!r}{hint}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Make YAML/Tune values (numpy scalars, 1e-4 as str, 3.0 for an int) the field's type."""
    base = {int, float, str, bool}
    types = [t for t in typing.get_args(hint) or (hint,) if t in base]
    if not types or value is None:
        return value
    t = types[0]
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t is int:
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        return t(value)
    except (TypeError, ValueError):
        raise InputError(f"{key} must be {t.__name__}, got {value!r}") from None
