"""Wake-ups for live streams: "job X changed" (a metric row, a state, a log line was noticed).

Writers run in worker threads (sync routes, the scheduler); readers are async SSE generators on
the event loop. `publish()` is thread-safe and hops onto the loop; `wait()` returns when the job
changes or after `timeout_s`. Streams re-read the store after every wake-up and every timeout, so
a missed wake-up only costs latency, and several control-plane processes sharing one database
still see each other's rows (within one timeout).
"""

from __future__ import annotations

import asyncio
import contextlib


class JobEvents:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called once from the app's lifespan, on the loop the streams run on."""
        self._loop = loop

    def publish(self, job_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    def waiter(self, job_id: str) -> asyncio.Event:
        """Take this BEFORE reading the store: a change after the read then still wakes the reader."""
        return self._events.setdefault(job_id, asyncio.Event())

    @staticmethod
    async def wait(event: asyncio.Event, *, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
