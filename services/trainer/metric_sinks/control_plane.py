"""Metric rows to the control plane, without ever slowing or stopping training.

    POST {control_plane_url}/v1/jobs/{job_id}/metrics
    Authorization: Bearer <token>                     (when a token is configured)
    {"rows": [{"step": 120, "time": 1767225600.123, "metrics": {"train/loss": 2.31, ...}}, ...]}

`log()` only appends the row to a buffer; a daemon thread sends the buffer in batches, in order.
While the control plane is unreachable (connection refused, timeout, HTTP 5xx, 408 or 429) the
thread retries with exponential backoff and the buffer keeps up to `max_rows` rows; past that the
oldest rows are dropped, with one warning and a count. Any other HTTP error (a 404 for an unknown
job, a 401 for a bad token) will not heal by retrying: one warning, and nothing more is sent.
`close()` gives the thread a few seconds to deliver what is left, then gives up.

The token comes from --control-plane-token-file, else from $DFLASH_CONTROL_PLANE_TOKEN; it only
ever goes into the request header, never into a log line.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from dflash_core.backoff import Backoff
from services.hidden_states.token_file import read_token_file
from services.trainer.metric_sinks.base import finite_or_none

logger = logging.getLogger(__name__)

TOKEN_ENV = "DFLASH_CONTROL_PLANE_TOKEN"

Outcome = Literal["sent", "retry", "refused"]


def read_token(token_file: Path | None, *, flag: str = "--control-plane-token-file") -> str | None:
    """The bearer token: the contents of `token_file` when given, else $DFLASH_CONTROL_PLANE_TOKEN."""
    if token_file is not None:
        return read_token_file(token_file, name=flag)
    return os.environ.get(TOKEN_ENV, "").strip() or None


def metrics_url(control_plane_url: str, job_id: str) -> str:
    return f"{control_plane_url.rstrip('/')}/v1/jobs/{quote(job_id, safe='')}/metrics"


class ControlPlaneSink:
    """Sends metric rows to the control plane from a background thread (see the module docstring).

    `dropped` (rows discarded because the buffer was full), `delivered`, `failed_attempts` and
    `refused` (a non-retryable HTTP error stopped sending) say what happened.
    """

    def __init__(
        self,
        *,
        url: str,
        job_id: str,
        token: str | None = None,
        max_rows: int = 100_000,
        batch_rows: int = 500,
        request_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.endpoint = metrics_url(url, job_id)
        self.max_rows = max_rows
        self.batch_rows = batch_rows
        self.request_timeout_s = request_timeout_s
        self.close_timeout_s = close_timeout_s
        # No jitter: one trainer posts to one control plane, so there is no herd to spread apart.
        self._backoff = Backoff(initial_s=min_backoff_s, maximum_s=max_backoff_s, jitter=0.0)
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._rows: deque[dict[str, Any]] = deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._close_requested = threading.Event()
        self._deadline: float | None = None  # monotonic time close() stops waiting at
        self.dropped = 0
        self.delivered = 0
        self.failed_attempts = 0
        self.refused = False
        self._thread = threading.Thread(target=self._run, name="control-plane-metrics", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training side
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one row; O(1), never blocks on the network."""
        row = {"step": step, "time": round(time.time(), 3), "metrics": finite_or_none(metrics)}
        with self._cond:
            if self.refused or self._close_requested.is_set():
                return
            self._rows.append(row)
            self._drop_oldest_over_cap()
            self._cond.notify()

    def close(self) -> None:
        """Deliver what is buffered within `close_timeout_s`, then stop the thread."""
        with self._cond:
            if self._close_requested.is_set():
                return
            self._deadline = time.monotonic() + self.close_timeout_s
            self._close_requested.set()
            self._cond.notify_all()
        # A request in flight is itself bounded by the deadline; the slack covers its return.
        self._thread.join(timeout=self.close_timeout_s + 1.0)
        with self._cond:
            undelivered = len(self._rows) + self._in_flight
        if undelivered and not self.refused:
            logger.warning(
                "%d metric rows were not delivered to %s before the %.0f s close deadline",
                undelivered,
                self.endpoint,
                self.close_timeout_s,
            )
        if self.dropped:
            logger.warning(
                "%d metric rows for %s were dropped in all (buffer of %d rows was full)",
                self.dropped,
                self.endpoint,
                self.max_rows,
            )

    def _drop_oldest_over_cap(self) -> None:
        """Caller holds the lock."""
        excess = len(self._rows) - self.max_rows
        if excess <= 0:
            return
        for _ in range(excess):
            self._rows.popleft()
        if not self.dropped:
            logger.warning(
                "control plane %s: %d metric rows buffered and it is still unreachable; dropping the "
                "oldest from now on (counted; the total is logged at the end)",
                self.endpoint,
                self.max_rows,
            )
        self.dropped += excess

    # ------------------------------------------------------------------ sender thread
    def _remaining_s(self) -> float | None:
        """Seconds left before the close deadline; None while the run goes on."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _run(self) -> None:
        try:
            self._send_until_closed()
        except Exception:  # a bug here must not go unnoticed, nor take training down
            logger.exception("control plane metrics thread failed; no more metrics are sent to it")
            with self._cond:
                self.refused = True

    def _send_until_closed(self) -> None:
        failures = 0  # in a row
        unreachable = False
        while True:
            with self._cond:
                while not self._rows and not self._close_requested.is_set():
                    self._cond.wait()
                remaining = self._remaining_s()
                if not self._rows or (remaining is not None and remaining <= 0):
                    return
                batch = [self._rows.popleft() for _ in range(min(len(self._rows), self.batch_rows))]
                self._in_flight = len(batch)
            timeout = self.request_timeout_s if remaining is None else min(self.request_timeout_s, remaining)
            outcome, reason = self._post(batch, timeout=timeout)
            with self._cond:
                self._in_flight = 0
                if outcome == "sent":
                    self.delivered += len(batch)
                elif outcome == "refused":
                    self.refused = True
                    self._rows.clear()
                else:
                    self.failed_attempts += 1
                    self._rows.extendleft(reversed(batch))  # back in front, still in order
                    self._drop_oldest_over_cap()
            if outcome == "refused":
                return
            if outcome == "sent":
                if unreachable:
                    logger.info("control plane %s reachable again", self.endpoint)
                unreachable, failures = False, 0
                continue
            if not unreachable:
                logger.warning(
                    "control plane %s unreachable (%s); keeping up to %d metric rows and retrying",
                    self.endpoint,
                    reason,
                    self.max_rows,
                )
                unreachable = True
            failures = self._wait(failures + 1)

    def _wait(self, failures: int) -> int:
        """Sleep before retry number `failures`; returns the failure count to go on from."""
        delay = self._backoff.delay(failures)
        remaining = self._remaining_s()
        if remaining is None:
            if self._close_requested.wait(delay):
                return 0  # close() woke us: retry now, and often, until its deadline
        else:
            time.sleep(max(0.0, min(delay, remaining)))
        return failures

    def _post(self, batch: list[dict[str, Any]], *, timeout: float) -> tuple[Outcome, str]:
        # urllib rather than an HTTP client library: one small POST per --log-freq steps, and no
        # library logging a line per request into the training log.
        body = json.dumps({"rows": batch}, allow_nan=False).encode()
        request = urllib.request.Request(self.endpoint, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
            return "sent", ""
        except urllib.error.HTTPError as exc:  # an answer, but not 2xx
            status, detail = exc.code, exc.read(200).decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
            return "retry", f"{type(exc).__name__}: {exc}"
        if status in (408, 429) or status >= 500:
            return "retry", f"HTTP {status}"
        logger.warning(
            "control plane %s refused metric rows: HTTP %d %s; no more metrics are sent to it",
            self.endpoint,
            status,
            detail,
        )
        return "refused", f"HTTP {status}"
