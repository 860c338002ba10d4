"""Helpers shared by the flat, frozen run configs (`TrainConfig`, `FinetuneConfig`, `ExtractConfig`).

One coercer (`coerce`), one unknown-key check (`reject_unknown_keys`) and one
dataclass -> argparse generator (`add_config_flags`): each option is written
once, as a dataclass field with its default and docstring.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from monoray.errors import InputError


def closest(key: Any, allowed: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The allowed key `key` most likely misspells, if any (the did-you-mean hint)."""
    near = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=cutoff)
    return near[0] if near else None


def reject_unknown_keys(d: Iterable[Any], allowed: Sequence[str], what: str) -> None:
    """One `InputError` for the first key not in `allowed`, with the closest match as a hint."""
    for key in d:
        if key not in allowed:
            near = closest(key, allowed)
            hint = f" (did you mean {near!r}?)" if near else ""
            raise InputError(f"unknown {what} key {key!r}{hint}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Make YAML/Tune values (numpy scalars, 1e-4 as str, 3.0 for an int) the field's type;
    a tuple field (`tuple[int, ...]`) takes a list or tuple and coerces each item."""
    if isinstance(value, list | tuple):
        for option in typing.get_args(hint) or (hint,):
            if typing.get_origin(option) is tuple:
                item = typing.get_args(option)[0]
                return tuple(coerce(key, v, item) for v in value)
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
        if isinstance(value, bool):  # YAML `true` is no number
            raise ValueError(value)
        if t is int:
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        return t(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{key} must be {t.__name__}, got {value!r}") from None


def parse_bool(text: str) -> bool:
    """argparse type of a bool flag (`--augment-flip false`)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_int_list(text: str) -> tuple[int, ...]:
    """argparse type of a tuple-of-ints flag (`--matryoshka-prefixes 16,64`)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def field_docs(cls: type) -> dict[str, str]:
    """First line of the docstring under each field of a dataclass (from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split()).split(". ")[0].rstrip(".")
    return docs


def field_defaults(*classes: type) -> dict[str, Any]:
    """Field name -> default of the dataclasses (later classes win; fields without one left out)."""
    out: dict[str, Any] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def add_config_flags(
    group: argparse._ActionsContainer,
    classes: Sequence[type],
    keys: Iterable[str],
    *,
    help: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One `--key-name` flag per config key, typed, documented and defaulted from the dataclasses.

    Flags default to None (the config's default applies), so a run's config holds
    only what was given. A key no class declares (a derived key such as
    `expansion`) is a float. `aliases` keeps old spellings of a flag working.
    """
    hints: dict[str, Any] = {}
    docs: dict[str, str] = {}
    for cls in classes:
        hints |= typing.get_type_hints(cls)
        docs |= field_docs(cls)
    defaults = field_defaults(*classes)
    for key in keys:
        hint = hints.get(key, float)
        args = typing.get_args(hint) or (hint,)
        types = [t for t in args if t in (int, float, str, bool)]
        kind = types[0] if types else str
        kwargs: dict[str, Any] = {"dest": key, "default": None, "metavar": key.upper()}
        kwargs["type"] = parse_bool if kind is bool else kind
        if typing.get_origin(hint) is tuple or tuple in map(typing.get_origin, args):
            kwargs["type"] = parse_int_list
        if choices and key in choices:
            kwargs["choices"] = list(choices[key])
            kwargs.pop("metavar")
        shown = f" (default: {defaults[key]})" if key in defaults else ""
        text = (help or {}).get(key) or docs.get(key) or key.replace("_", " ")
        kwargs["help"] = text.replace("%", "%%") + shown
        flags = [f"--{key.replace('_', '-')}", *(aliases or {}).get(key, ())]
        group.add_argument(*flags, **kwargs)
