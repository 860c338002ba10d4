"""Which torch device a run uses: one spelling of the choices, checked the same everywhere."""

from __future__ import annotations

import torch

from monoray.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
"""Device names a config takes, besides cuda:N."""


def check_device(name: str) -> None:
    """`InputError` unless `name` is auto, cpu, cuda or cuda:N (config validation)."""
    if not (name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA if available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)
