"""Each job's files on disk, and its log: append, tail, follow, and a size bound.

    <jobs-dir>/<job id>/trainer.yaml   the TrainConfig the trainer is started with
                        train.log      the trainer's stdout and stderr, plus our own lines
                        exit_status    written by the launcher when the trainer ends

The trainer writes straight into train.log (an O_APPEND file descriptor it inherits), not
through a pipe to us: a trainer outlives a control-plane restart instead of dying of a broken
pipe, and the restarted control plane reads on where it left off.

Progress bars rewrite their line with `\r`; readers get each line as a terminal would show it
(the text after the last `\r`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TAIL_BLOCK = 64 * 1024
TAIL_MAX_BYTES = 8 << 20  # a tail never reads more than this from the end of the file


@dataclass(frozen=True)
class JobFiles:
    folder: Path

    @classmethod
    def of(cls, jobs_dir: Path, job_id: str) -> JobFiles:
        return cls(jobs_dir / job_id)

    @property
    def log(self) -> Path:
        return self.folder / "train.log"

    @property
    def trainer_config(self) -> Path:
        return self.folder / "trainer.yaml"

    @property
    def exit_status(self) -> Path:
        return self.folder / "exit_status"

    def read_exit_status(self) -> int | None:
        try:
            return int(self.exit_status.read_text().strip())
        except (OSError, ValueError):
            return None


def as_shown(line: str) -> str:
    """A line as a terminal shows it: carriage returns overwrite, the last segment wins."""
    segments = [s for s in line.split("\r") if s.strip()]
    return segments[-1].rstrip() if segments else ""


def append_line(path: Path, text: str) -> None:
    """One line from the control plane itself, marked as such (O_APPEND: safe beside the trainer).

    Best effort: a log that cannot be written (a full disk) costs the line, never the state change
    it describes, which callers make right after."""
    stamp = time.strftime("%H:%M:%S")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"[control plane {stamp}] {text}\n")
    except OSError as exc:
        logger.warning("job log %s: cannot write %r (%s)", path, text, exc.strerror or exc)


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` non-empty lines (as shown), reading at most TAIL_MAX_BYTES from the end."""
    return tail_with_offset(path, lines)[0]


def tail_with_offset(path: Path, lines: int) -> tuple[list[str], int]:
    """(the last `lines` complete lines, the byte offset just after the last of them): a follower
    continues from that offset, so it neither repeats nor skips a line."""
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            start, data = end, b""
            while start > 0 and data.count(b"\n") <= lines and end - start < TAIL_MAX_BYTES:
                step = min(TAIL_BLOCK, start)
                start -= step
                handle.seek(start)
                data = handle.read(step) + data
    except FileNotFoundError:
        return [], 0
    cut = data.rfind(b"\n")
    if cut < 0:  # not one complete line yet
        return [], start
    text = data[:cut].decode("utf-8", errors="replace").split("\n")
    if start > 0:
        text = text[1:]  # the first piece may be a cut line
    shown = [line for line in map(as_shown, text) if line]
    return (shown[-lines:] if lines > 0 else []), start + cut + 1


def read_from(path: Path, offset: int, *, max_bytes: int = 1 << 20) -> tuple[list[str], int]:
    """Complete lines after byte `offset` (as shown) and the offset after the last of them.

    A file shorter than `offset` was trimmed: reading starts over at its beginning.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size < offset:
                offset = 0
            handle.seek(offset)
            data = handle.read(max_bytes)
    except FileNotFoundError:
        return [], offset
    cut = data.rfind(b"\n")
    if cut < 0:
        return [], offset
    chunk = data[: cut + 1].decode("utf-8", errors="replace")
    shown = [as_shown(line) for line in chunk.split("\n")]
    return [line for line in shown if line], offset + cut + 1


def end_offset(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def trim(path: Path, max_bytes: int) -> bool:
    """Keep the newest half of a log that grew past `max_bytes`; True when it was trimmed.

    The trainer keeps appending through its own descriptor while we do this, so a line it writes
    between our read and the truncate (a few microseconds) is lost, and one written between the
    truncate and our rewrite lands before the kept half; the marker line says a cut happened.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
        with open(path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            keep = max_bytes // 2
            handle.seek(size - keep)
            data = handle.read()
            newline = data.find(b"\n")
            data = data[newline + 1 :] if newline >= 0 else data
            marker = (
                f"[control plane {time.strftime('%H:%M:%S')}] log over {max_bytes} bytes: "
                f"{size - len(data)} older bytes dropped\n"
            ).encode()
            handle.truncate(0)
        # Appending (never writing at an offset) cannot overwrite what the trainer appends meanwhile.
        with open(path, "ab") as handle:
            handle.write(marker + data)
    except FileNotFoundError:
        return False
    return True
