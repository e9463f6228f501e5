"""Atomic file writing: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # mkstemp makes 0600 files; outputs, manifests and checkpoints are shared


def _fsync(path: str | Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = FILE_MODE) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: renamed onto ``path`` when the block exits
    normally, deleted otherwise, so an interrupted write leaves the previous file (or none).

    Durable as well as atomic: the file's data reach the disk before the rename, and the
    rename before the call returns (the folder is synced too), so a power cut leaves the old
    file or the new one, never an empty one under the old name (ext4 and xfs may otherwise
    commit the rename before the data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``atomic_path``)."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
