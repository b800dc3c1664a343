"""The metric-sink interface and `MetricSinks`, which fans one `log` call out to every sink."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Protocol

logger = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def finite_or_none(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Plain floats, with NaN/Inf as None: JSON has no NaN, and one would make the row unreadable."""
    values = {name: float(value) for name, value in metrics.items()}
    return {name: (value if math.isfinite(value) else None) for name, value in values.items()}


class MetricSinks:
    """Fans one `log` call out to every sink.

    A sink that raises is reported once and the others still get the row: a tracker's outage must
    not end a training run. `close` closes every sink even when one of them fails.
    """

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks
        self._failed: set[int] = set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            try:
                sink.log(metrics, step)
            except Exception:
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    logger.exception(
                        "metric sink %s failed at step %d; training goes on (reported once per sink)",
                        type(sink).__name__,
                        step,
                    )

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("metric sink %s failed to close", type(sink).__name__)
