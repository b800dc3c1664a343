"""Live streams (the metric stream, a followed log) capped per client and in total: 429 beyond.

Each open stream holds a connection, a task and a store poll every second for as long as the
client keeps it open, so an unbounded number of them (a script in a loop, a dashboard left open
in many tabs) would starve everyone else. A client is its address: behind a reverse proxy every
user shares the proxy's, so raise --max-streams-per-client there.

An ASGI middleware: a slot is taken before the route runs and given back when the response
ends, however it ends (the job finished, the client went away, the server stopped).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

_METRIC_STREAM = re.compile(r"^/v1/jobs/[^/]+/metrics/stream$")
_LOGS = re.compile(r"^/v1/jobs/[^/]+/logs$")
_TRUE = {"1", "true", "t", "yes", "y", "on"}  # what the route's `follow: bool` takes as true
RETRY_AFTER_S = 10


def is_live_stream(method: str, path: str, query_string: bytes) -> bool:
    if method != "GET":
        return False
    if _METRIC_STREAM.match(path):
        return True
    if _LOGS.match(path):
        follow = parse_qs(query_string.decode("latin-1")).get("follow", [])
        return bool(follow) and follow[-1].strip().lower() in _TRUE
    return False


class StreamLimit:
    def __init__(self, app: ASGIApp, *, per_client: int, total: int) -> None:
        self.app = app
        self.per_client = per_client
        self.total = total
        # One event loop runs every request: plain counters need no lock.
        self.open: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_live_stream(
            scope["method"], scope["path"], scope.get("query_string", b"")
        ):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        problem = self._problem(client)
        if problem is not None:
            await _too_many(send, problem)
            return
        self.open[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]

    def _problem(self, client: str) -> str | None:
        if self.open[client] >= self.per_client:
            return (
                f"{self.open[client]} live streams are open from {client} already, the most one client "
                f"may hold (--max-streams-per-client {self.per_client}); close one first"
            )
        if sum(self.open.values()) >= self.total:
            return f"{self.total} live streams are open, the most this control plane serves (--max-streams)"
        return None


async def _too_many(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
