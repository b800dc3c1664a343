"""Which GPUs this host has and which of them are free.

The assignment of record is the store: a GPU is busy while a job holding it is starting or
running. The scheduler computes the free set from there on every pass, so a restarted control
plane (whose re-attached jobs keep their GPUs) can never hand a busy GPU to a second job.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

logger = logging.getLogger(__name__)


def detect_gpus() -> list[int]:
    """GPU indices `nvidia-smi` lists; none when it is missing or fails (a CPU-only host)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed (%s): running without GPUs; pass --gpus to name them", exc)
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def pick_gpus(*, all_gpus: list[int], busy: set[int], count: int) -> list[int] | None:
    """`count` free GPUs (lowest indices first), or None when not enough are free."""
    free = [gpu for gpu in all_gpus if gpu not in busy]
    return free[:count] if len(free) >= count else None
