"""Capped exponential back-off: how long to wait before retry number n.

Used by every retry loop that talks to another service (hidden-state streams, metric posts), so
they all grow their pauses the same way. Jitter spreads many clients' retries apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Delay `initial_s * factor**(n-1)`, at most `maximum_s`, times a uniform 1 +- `jitter`."""

    initial_s: float = 0.5
    maximum_s: float = 8.0
    factor: float = 2.0
    jitter: float = 0.25

    def delay(self, failures: int) -> float:
        """Pause before attempt number `failures` (1 = first retry)."""
        base = min(self.maximum_s, self.initial_s * self.factor ** max(failures - 1, 0))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else base
