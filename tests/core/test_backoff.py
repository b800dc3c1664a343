"""dflash_core.backoff: capped exponential delays, with or without jitter."""

from __future__ import annotations

from dflash_core.backoff import Backoff


def test_delays_double_up_to_the_cap_without_jitter():
    backoff = Backoff(initial_s=0.5, maximum_s=3.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(0, 6)] == [0.5, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_stays_within_its_band():
    backoff = Backoff(initial_s=1.0, maximum_s=8.0, jitter=0.25)
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(3.0 <= d <= 5.0 for d in delays) and len(set(delays)) > 1
