"""The one user-facing error type.

Anything a user can cause (bad YAML, a missing file, NaN features, a dimension
mismatch, an impossible resource request) raises `InputError` with a single
line saying what and where. The CLI turns it into that line on stderr and exit
code 2, with no traceback. It subclasses `ValueError` so library callers can
catch it the usual way.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message is one line naming what and where."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
