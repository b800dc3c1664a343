"""The control plane's job routes as method calls (standard library HTTP); `dflash demo` uses it,
and the trainer agent's client (services/agent/client.py) sends its requests through it.

    jobs = JobsClient("http://127.0.0.1:8600", token=None)
    job = jobs.submit({"data_path": "...", "gpus": 0})
    for name, data in jobs.metric_events(job["id"]):   # the live SSE stream: job, metrics, end
        ...
    jobs.cancel(job["id"]); print(jobs.logs(job["id"], lines=40))

Answers are the routes' JSON as plain dicts (docs/control_plane.md describes every field).
urllib rather than httpx: httpx is a test-only dependency, and the demo must run from a plain
install. An answer that says no (4xx, 5xx) raises `ApiError` with the route's `detail`; no
answer at all raises `OSError` (connection refused, timeout).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from services.control_plane.browser_guard import CLIENT_HEADER
from services.control_plane.states import TERMINAL_STATES, JobState


def job_ended(job: dict[str, Any]) -> bool:
    """The job (as the API returns it) is succeeded, failed or cancelled."""
    return JobState(job["state"]) in TERMINAL_STATES


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class JobsClient:
    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # X-DFlash-Client: what a cross-site page cannot send (services/control_plane/browser_guard.py).
        self._headers = {CLIENT_HEADER: "dflash", **({"Authorization": f"Bearer {token}"} if token else {})}
        # No proxy: $http_proxy without a no_proxy entry would send 127.0.0.1 requests through it.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ routes
    def healthy(self) -> bool:
        """GET /healthz answers (False while the service starts, or when it is gone)."""
        try:
            with self._request("GET", "/healthz", timeout_s=2.0):
                pass
        except (OSError, http.client.HTTPException, ApiError):
            return False
        return True

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/jobs: the job as queued (422 `ApiError` names the invalid fields)."""
        return self.request_json("POST", "/v1/jobs", body=body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request_json("GET", f"/v1/jobs/{quote(job_id, safe='')}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/cancel: a running trainer gets SIGTERM and checkpoints first."""
        return self.request_json("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metric row of the job so far: {"id", "attempt", "step", "time", "metrics": {...}}."""
        return self.request_json("GET", f"/v1/jobs/{quote(job_id, safe='')}/metrics")["data"]

    def logs(self, job_id: str, *, lines: int = 100) -> str:
        """The last `lines` lines of the job's log (trainer output and the control plane's notes)."""
        query = urlencode({"lines": lines})
        with self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/logs?{query}") as response:
            return response.read().decode(errors="replace")

    def metric_events(self, job_id: str, *, timeout_s: float = 60.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """GET /v1/jobs/{id}/metrics/stream as (event name, parsed data): `job` at every state
        change, `metrics` per row (the rows so far first), `end` last. The server sends a comment
        every 15 s, so `timeout_s` of silence means the service is gone."""
        path = f"/v1/jobs/{quote(job_id, safe='')}/metrics/stream"
        headers = {"Accept": "text/event-stream"}
        with self._request("GET", path, headers=headers, timeout_s=timeout_s) as response:
            name, data = "message", []
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if not line:  # a blank line ends an event
                    if data:
                        yield name, json.loads("\n".join(data))
                        if name == "end":
                            return
                    name, data = "message", []
                elif line.startswith(":"):  # keep-alive comment
                    continue
                else:
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        name = value
                    elif field == "data":
                        data.append(value)

    # ------------------------------------------------------------------ plumbing
    def request_json(self, method: str, path: str, *, body: dict[str, Any] | bytes | None = None) -> Any:
        """Any route: its JSON answer (None for an empty one, e.g. 204). A dict body goes as JSON,
        bytes as application/octet-stream."""
        with self._request(method, path, body=body) as response:
            return json.loads(response.read() or b"null")

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        all_headers = {**self._headers, **(headers or {})}
        data = None
        if isinstance(body, bytes):
            data = body
            all_headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        elif method == "POST":
            data = b""
        request = urllib.request.Request(self.url + path, data=data, headers=all_headers, method=method)
        try:
            return self._opener.open(request, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:4000]
            try:
                detail = json.loads(text).get("detail", text)
            except (ValueError, AttributeError):
                detail = text
            raise ApiError(exc.code, detail if isinstance(detail, str) else json.dumps(detail)) from None
