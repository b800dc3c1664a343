"""Metric sinks behind one interface: `log(metrics, step)`.

Metric names use a `train/` or `val/` prefix; per-slot accuracy is `train/acc_slot_{k}` for
k = 1..B-1 and the acceptance length is `train/eal` (1 + leading run of correct slots, vLLM's
convention).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line: {"step", "time", ...metrics}. Appends, so a resumed run continues it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        # JSON has no NaN/Inf; write them as null rather than producing an unreadable file.
        row.update({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LoggingSink:
    """A compact line in the log for the metrics people watch."""

    KEYS = ("loss", "acc", "eal", "lr", "grad_norm", "tokens_per_s", "data_wait_frac")

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = [
            f"{name}={value:.4g}" for name, value in metrics.items() if name.split("/", 1)[-1] in self.KEYS
        ]
        logger.info("step %d %s", step, " ".join(shown))

    def close(self) -> None:
        pass


class MetricSinks:
    """Fans one `log` call out to every sink."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
