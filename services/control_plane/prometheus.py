"""`GET /metrics` in the Prometheus text format (version 0.0.4), written by hand: no dependency.

HTTP requests are counted and timed by `RequestMetrics` (ASGI middleware) under the route
template (`/v1/jobs/{job_id}`), never the raw path, and under the method only when it is a
standard one (`other` otherwise), so the number of series stays bounded; requests no route
matched count as `unmatched`. Job counts by state come from the store at
scrape time. Streaming routes (SSE, log follow, archives) are timed to the end of the stream.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "dflash_control_plane"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Exposition:
    """Builds one scrape: `# HELP`, `# TYPE` and samples, metric family by family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {PREFIX}_{name} {help_text}")
        self.lines.append(f"# TYPE {PREFIX}_{name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        self.lines.append(f"{PREFIX}_{name}{_labels(labels or {})} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Request count and latency histogram per (method, route, status)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[tuple[str, str, str], int] = defaultdict(int)
        # (method, route) -> [bucket counts..., +Inf count], sum of seconds
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sum: dict[tuple[str, str], float] = defaultdict(float)

    def observe(self, *, method: str, route: str, status: int, seconds: float) -> None:
        # Any token is a valid HTTP method: unknown ones share one label, or each would add series.
        method = method if method in KNOWN_METHODS else "other"
        status = status if 100 <= status <= 599 else 0
        with self._lock:
            self._count[(method, route, str(status))] += 1
            buckets = self._buckets.setdefault((method, route), [0] * (len(BUCKETS) + 1))
            buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum[(method, route)] += seconds

    def write(self, out: Exposition) -> None:
        with self._lock:
            counts = dict(self._count)
            buckets = {k: list(v) for k, v in self._buckets.items()}
            sums = dict(self._sum)
        out.family("http_requests_total", "counter", "HTTP requests answered, by method, route and status.")
        for (method, route, status), n in sorted(counts.items()):
            out.sample("http_requests_total", n, {"method": method, "route": route, "status": status})
        out.family(
            "http_request_duration_seconds", "histogram", "Time from request to the end of the response."
        )
        for (method, route), per_bucket in sorted(buckets.items()):
            cumulative = 0
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], per_bucket, strict=True):
                cumulative += n
                labels = {"method": method, "route": route, "le": bound}
                out.sample("http_request_duration_seconds_bucket", cumulative, labels)
            out.sample(
                "http_request_duration_seconds_sum", sums[(method, route)], {"method": method, "route": route}
            )
            out.sample("http_request_duration_seconds_count", cumulative, {"method": method, "route": route})


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def capture_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(
                method=scope["method"], route=route, status=status, seconds=time.perf_counter() - started
            )


def write_job_states(out: Exposition, counts: Mapping[str, int]) -> None:
    out.family("jobs", "gauge", "Jobs in the store, by state.")
    for state, n in counts.items():
        out.sample("jobs", n, {"state": state})


def write_gauges(out: Exposition, values: Iterable[tuple[str, str, float]]) -> None:
    """(name, help, value) triples, one gauge family each."""
    for name, help_text, value in values:
        out.family(name, "gauge", help_text)
        out.sample(name, value)
