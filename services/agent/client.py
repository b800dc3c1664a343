"""The control plane's agent routes, as method calls (stdlib HTTP: a trainer image needs nothing more).

Errors are two kinds, because the agent reacts differently:
- `Unreachable`: no answer (refused, timeout, 5xx). Keep the trainers running and try again.
- `Refused`: an answer that says no (404 unknown agent, 401/403 token, 409, 422), with its detail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from services.control_plane.schemas import AgentHeartbeat, AgentJob, AgentOrders, AgentPublic, AgentRegister


class Unreachable(ConnectionError):
    pass


class Refused(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class ControlPlaneClient:
    def __init__(self, url: str, *, token: str | None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, path: str, *, body: bytes | None = None, content_type: str = "application/json") -> Any:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body or b"", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            if exc.code >= 500:
                raise Unreachable(f"{self.url}{path}: HTTP {exc.code}") from None
            with contextlib.suppress(ValueError, AttributeError):
                detail = str(json.loads(detail).get("detail", detail))
            raise Refused(exc.code, detail) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise Unreachable(f"{self.url}{path}: {getattr(exc, 'reason', exc)}") from None
        return json.loads(payload) if payload else None

    @staticmethod
    def _json(model: Any) -> bytes:
        return model.model_dump_json().encode()

    def register(self, body: AgentRegister) -> AgentPublic:
        return AgentPublic.model_validate(self._call("/v1/agents", body=self._json(body)))

    def heartbeat(self, agent_id: str, body: AgentHeartbeat) -> AgentOrders:
        answer = self._call(f"/v1/agents/{quote(agent_id, safe='')}/heartbeat", body=self._json(body))
        return AgentOrders.model_validate(answer)

    def claim(self, agent_id: str) -> AgentJob | None:
        answer = self._call(f"/v1/agents/{quote(agent_id, safe='')}/claim")
        return AgentJob.model_validate(answer) if answer else None

    def append_log(self, agent_id: str, job_id: str, data: bytes) -> None:
        path = f"/v1/agents/{quote(agent_id, safe='')}/jobs/{quote(job_id, safe='')}/log"
        self._call(path, body=data, content_type="application/octet-stream")

    def goodbye(self, agent_id: str) -> None:
        self._call(f"/v1/agents/{quote(agent_id, safe='')}/goodbye")
