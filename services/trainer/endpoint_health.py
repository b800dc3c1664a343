"""How the trainer treats a hidden-state endpoint that fails: backoff, then a circuit breaker.

Transient failures (a restart, a dropped connection) are retried after an exponentially growing
pause with jitter, so many trainers do not reconnect in lockstep. After `threshold` failures in a
row the breaker opens: the endpoint gets no traffic for `cooldown_s`, then one trial connection
(half-open). Any delivered sample closes it again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dflash_core.backoff import Backoff


@dataclass
class CircuitBreaker:
    threshold: int = 5
    # Short enough that a restarted service (tens of seconds for vLLM) is found again quickly.
    cooldown_s: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    failures: int = 0
    opened_at: float | None = None
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_success(self) -> None:
        with self._lock:
            self.failures = 0
            self.opened_at = None

    def record_failure(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = error
            if self.failures >= self.threshold and self.opened_at is None:
                self.opened_at = time.monotonic()

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self.opened_at is not None and time.monotonic() - self.opened_at < self.cooldown_s

    def wait_before_attempt(self) -> float:
        """Seconds to wait before the next connection attempt (0 after a success)."""
        with self._lock:
            if self.opened_at is not None:
                remaining = self.cooldown_s - (time.monotonic() - self.opened_at)
                if remaining > 0:
                    return remaining
                # Half-open: one trial; a failure re-opens the breaker for another cooldown.
                self.opened_at = None
                self.failures = self.threshold - 1
                return 0.0
            return self.backoff.delay(self.failures) if self.failures else 0.0

    def describe(self) -> str:
        state = "open" if self.is_open else ("retrying" if self.failures else "ok")
        return f"{state}, {self.failures} failure(s) in a row" + (
            f", last: {self.last_error}" if self.last_error else ""
        )
