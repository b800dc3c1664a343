"""Atomic writes: a reader sees the old file (or folder) or the new one, never part of either.

Everything is written into a hidden temporary sibling (`.tmp-<name>-<random>`, same filesystem,
so the rename is atomic), fsynced, then renamed into place; the parent directory is fsynced so
the rename itself survives a crash. On any error (KeyboardInterrupt included) the temporary
sibling is removed and the error goes on; whatever was at the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

# Hidden siblings that are never the real thing: in-progress writes and folders being replaced.
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def temp_sibling(path: Path, *, prefix: str = TEMP_PREFIX) -> Path:
    """A fresh hidden name next to `path`: `<prefix><name>-<8 hex>`."""
    return path.parent / f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make new entries and renames in `path` durable; a no-op where the filesystem refuses."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces `path` (renamed; fsynced first
    and after unless `durable=False`, for files a reader can rebuild: a cache)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8, whatever the locale."""
    write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on a clean exit it replaces the folder `path`.

    Every file in it is fsynced first. An existing folder at `path` is moved aside, put back if
    the rename fails, and deleted once the new one is in place; a file or symlink at `path` is
    refused (FileExistsError). `path`'s parent is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(folder, name))
            fsync_dir(Path(folder))
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    if path.is_symlink() or path.is_file():
        raise FileExistsError(f"{path} exists and is not a folder")
    old = None
    if path.exists():
        old = temp_sibling(path, prefix=OLD_PREFIX)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)  # put the previous folder back
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
