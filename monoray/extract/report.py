"""`<store>/bad_images.jsonl`: one JSON line {"id", "path", "error"} per skipped image.

Lines for a shard are appended (and fsynced) before the shard itself is
written, so after a crash the report covers at least every finished shard;
on resume, lines at or past the first unfinished id are dropped and the
batches that produced them are decoded again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from monoray.errors import InputError
from monoray.extract.batches import BadImage
from monoray.runs.files import atomic_write_bytes

BAD_IMAGES = "bad_images.jsonl"
"""File name of the bad-image report inside the store directory."""


class BadImageReport:
    """Append-only report of skipped images, trimmed to the finished part on resume."""

    def __init__(self, store: Path, *, resume_from: int) -> None:
        self.path = store / BAD_IMAGES
        kept: list[BadImage] = []
        if self.path.exists():
            old = read_bad_images(self.path, partial_tail_ok=True)
            kept = [b for b in old if b.id < resume_from]
        atomic_write_bytes(self.path, b"".join(_line(b) for b in kept))
        self.count = len(kept)
        """Bad images reported so far (finished shards plus this run)."""

    def add(self, bad: Iterable[BadImage]) -> None:
        """Append and fsync."""
        data = b"".join(_line(b) for b in bad)
        if not data:
            return
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.count += data.count(b"\n")


def read_bad_images(path: Path, *, partial_tail_ok: bool = False) -> list[BadImage]:
    """All entries of a report file; `InputError` naming the line if it is damaged.

    `partial_tail_ok` ignores a last line cut short by a crash (no final newline).
    """
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(BadImage(int(d["id"]), str(d["path"]), str(d["error"])))
        except (ValueError, KeyError, TypeError):
            if partial_tail_ok and n == len(lines) and not text.endswith("\n"):
                break
            raise InputError(f"{path}: line {n} is not a bad-image record") from None
    return out


def _line(b: BadImage) -> bytes:
    return (json.dumps(b.to_dict(), ensure_ascii=False) + "\n").encode()
