"""dflash_core.atomic_files: a reader sees the old content or the new, and no temporary is left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dflash_core import atomic_files
from dflash_core.atomic_files import atomic_file, atomic_folder, write_bytes, write_text


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_replaces_the_whole_file(tmp_path):
    target = tmp_path / "sub" / "info.json"
    target.parent.mkdir()
    write_text(target, "first, and longer\n")
    write_bytes(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert _hidden(target.parent) == []


def test_a_reader_never_sees_a_partial_file(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"half of the n")
        assert target.read_bytes() == b"old"  # mid-write, the reader still gets the old file
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space"), atomic_file(target) as tmp:
        tmp.write_bytes(b"par")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and _hidden(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"par")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_folder_is_swapped_in_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("2")
        assert not target.exists()  # nothing at the target until the folder is complete
    assert (target / "a.txt").read_text() == "1" and (target / "nested" / "b.txt").read_text() == "2"
    with atomic_folder(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]  # nothing of the old folder survives
    assert _hidden(tmp_path) == []


def test_folder_error_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(ValueError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise ValueError("bad row")
    assert (target / "a.txt").read_text() == "old" and _hidden(tmp_path) == []


def test_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(atomic_files.TEMP_PREFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert (target / "a.txt").read_text() == "old" and _hidden(tmp_path) == []


def test_folder_refuses_to_replace_a_file_or_symlink(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    os.symlink("dir", tmp_path / "link")
    for name in ("file", "link"):
        with pytest.raises(FileExistsError, match="not a folder"), atomic_folder(tmp_path / name):
            pass
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "link").is_symlink()
    assert _hidden(tmp_path) == []
