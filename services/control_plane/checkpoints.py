"""A job's checkpoints: the folders under its save_path, and a tar.gz stream of one of them.

The layout is the trainer's (dflash_core.checkpoint, services/trainer/checkpointing.py):

    <save_path>/0/ 1/ ...        one per finished epoch
    <save_path>/step-<n>/        the newest --checkpoint-freq checkpoint
    <save_path>/latest, checkpoint_best    symlinks to one of those

Only JSON is read here (training_state.json), never torch: listing checkpoints must stay cheap
and must not import the trainer's stack into the web service. The file names are the ones
dflash_core.checkpoint writes (a test holds the two together).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import queue
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from services.control_plane.schemas import CheckpointPublic

CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.json"
LATEST_LINK = "latest"
BEST_LINK = "checkpoint_best"
LINKS = (LATEST_LINK, BEST_LINK)

_FOLDER = re.compile(r"^(?P<epoch>\d+)$|^step-(?P<step>\d+)$")


class CheckpointNotFound(LookupError):
    pass


def _link_target(save_path: Path, link: str) -> str | None:
    """The folder name a link points at, when it points at a folder directly under save_path."""
    path = save_path / link
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    return target.name if target.parent == Path(os.path.realpath(save_path)) and target.is_dir() else None


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink())


def _describe(folder: Path) -> CheckpointPublic | None:
    match = _FOLDER.match(folder.name)
    if match is None or folder.is_symlink() or not (folder / CONFIG_FILE).is_file():
        return None
    try:
        state = json.loads((folder / TRAINING_STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}  # an export without training state is still a checkpoint vLLM can serve
    epoch = int(match["epoch"]) if match["epoch"] is not None else None
    val_loss = None
    if epoch is not None:
        for row in state.get("history") or []:
            if isinstance(row, dict) and row.get("epoch") == epoch:
                val_loss = row.get("val/loss")
    step = state.get("global_step")
    return CheckpointPublic(
        name=folder.name,
        kind="epoch" if epoch is not None else "step",
        epoch=epoch,
        step=int(step) if isinstance(step, int) else (int(match["step"]) if match["step"] else None),
        val_loss=float(val_loss) if isinstance(val_loss, (int, float)) else None,
        size_bytes=_folder_size(folder),
        modified_at=datetime.fromtimestamp(folder.stat().st_mtime, tz=timezone.utc),
    )


def list_checkpoints(save_path: Path) -> tuple[list[CheckpointPublic], dict[str, str | None]]:
    """(checkpoints oldest first, {"latest": name, "checkpoint_best": name})."""
    if not save_path.is_dir():
        return [], dict.fromkeys(LINKS)
    found = [c for c in (_describe(p) for p in save_path.iterdir() if p.is_dir()) if c is not None]
    found.sort(key=lambda c: (c.step if c.step is not None else -1, c.kind == "epoch", c.name))
    return found, {link: _link_target(save_path, link) for link in LINKS}


def checkpoint_folder(save_path: Path, name: str) -> Path:
    """The folder `name` names (a folder or one of the links), inside save_path, or CheckpointNotFound."""
    if name in LINKS:
        target = _link_target(save_path, name)
        if target is None:
            raise CheckpointNotFound(f"{name} does not point at a checkpoint (yet)")
        name = target
    if _FOLDER.match(name) is None:
        raise CheckpointNotFound(
            f"{name!r} is not a checkpoint name (an epoch number, step-<n>, or {', '.join(LINKS)})"
        )
    folder = save_path / name
    if _describe(folder) is None:
        raise CheckpointNotFound(f"no checkpoint {name} in {save_path}")
    return folder


# ---------------------------------------------------------------------- archive
_END = object()


@dataclass
class _Aborted:
    reason: str


class _QueueWriter(io.RawIOBase):
    """A write-only file whose writes become queue items; blocks while the reader lags behind."""

    def __init__(self, chunks: queue.Queue, stop: threading.Event, *, stall_s: float) -> None:
        self.chunks = chunks
        self.stop = stop
        self.stall_s = stall_s

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        waited = 0.0
        while True:
            if self.stop.is_set():
                raise BrokenPipeError("archive download abandoned")
            try:
                self.chunks.put(bytes(data), timeout=0.5)
                return len(data)
            except queue.Full:
                waited += 0.5
                if waited >= self.stall_s:
                    raise BrokenPipeError(f"archive reader stalled for {self.stall_s:.0f} s") from None


def archive_stream(
    folder: Path, *, arcname: str, chunk_bytes: int = 1 << 20, max_chunks: int = 16, stall_s: float = 300.0
) -> Iterator[bytes]:
    """`folder` as a tar.gz, produced by a thread while the response is sent (memory stays at
    about `max_chunks` × `chunk_bytes`, whatever the checkpoint's size).

    gzip level 1: weights barely compress, and level 9 would make the CPU the bottleneck.
    """
    chunks: queue.Queue = queue.Queue(maxsize=max_chunks)
    stop = threading.Event()

    def produce() -> None:
        writer = io.BufferedWriter(_QueueWriter(chunks, stop, stall_s=stall_s), buffer_size=chunk_bytes)
        try:
            with (
                gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=1) as zipped,
                tarfile.open(fileobj=zipped, mode="w|") as tar,
            ):
                for path in sorted(folder.iterdir()):
                    if path.is_file() and not path.is_symlink():
                        tar.add(path, arcname=f"{arcname}/{path.name}", recursive=False)
            writer.flush()
            chunks.put(_END)
        except Exception as exc:  # reported to the reader, which ends the response
            if not stop.is_set():
                chunks.put(_Aborted(f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=produce, name=f"archive-{arcname}", daemon=True)
    thread.start()
    try:
        while True:
            item = chunks.get()
            if item is _END:
                return
            if isinstance(item, _Aborted):
                # The status line is gone already; a cut stream is how the client learns of it.
                raise OSError(f"archive of {folder} failed: {item.reason}")
            yield item
    finally:
        stop.set()
