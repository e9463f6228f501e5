"""Atomic, durable file writing (dsp/files.py): the previous file survives a failed write, and
the data and the rename are synced to disk in that order."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dsp import files
from dsp.files import atomic_path, write_json_atomic


def test_a_write_replaces_the_file_shared_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert path.read_text() == '{\n "a": 2\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == files.FILE_MODE
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_text("previous")

    def killed_mid_write() -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        killed_mid_write()
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_data_then_rename_then_folder_reach_the_disk(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of the temporary file before the rename, of the folder after it: a power cut
    leaves the old file or the new one, never an empty one under the name."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync dir" if os.path.isdir(target) else f"fsync {Path(target).name}")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(tmp_path / "ckpt.pt") as tmp:
        tmp.write_bytes(b"weights")
        name = tmp.name
    assert events == [f"fsync {name}", "rename", "fsync dir"]
    assert (tmp_path / "ckpt.pt").read_bytes() == b"weights"
