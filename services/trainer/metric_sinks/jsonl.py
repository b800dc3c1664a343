"""`<save_path>/metrics.jsonl`: one JSON object per logged step."""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.trainer.metric_sinks.base import finite_or_none


class JsonlSink:
    """One JSON object per line: {"step", "time", ...metrics}. Appends, so a resumed run continues it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row: dict[str, float | None] = {"step": step, "time": round(time.time(), 3)}
        # JSON has no NaN/Inf; write them as null rather than producing an unreadable file.
        row.update(finite_or_none(metrics))
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
