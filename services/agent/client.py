"""The control plane's agent routes, as method calls (over the job client's standard-library HTTP).

Errors are two kinds, because the agent reacts differently:
- `Unreachable`: no answer (refused, timeout, 5xx). Keep the trainers running and try again.
- `Refused`: an answer that says no (404 unknown agent, 401/403 token, 409, 422), with its detail.
"""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from services.control_plane.client import ApiError, JobsClient
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
        self._http = JobsClient(self.url, token=token, timeout_s=timeout_s)

    def _post(self, path: str, body: BaseModel | bytes | None = None) -> Any:
        payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        try:
            return self._http.request_json("POST", path, body=payload)
        except ApiError as exc:
            if exc.status >= 500:
                raise Unreachable(f"{self.url}{path}: HTTP {exc.status}") from None
            raise Refused(exc.status, exc.detail) from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"{self.url}{path}: {getattr(exc, 'reason', exc)}") from None

    @staticmethod
    def _agent(agent_id: str) -> str:
        return f"/v1/agents/{quote(agent_id, safe='')}"

    def register(self, body: AgentRegister) -> AgentPublic:
        return AgentPublic.model_validate(self._post("/v1/agents", body))

    def heartbeat(self, agent_id: str, body: AgentHeartbeat) -> AgentOrders:
        return AgentOrders.model_validate(self._post(f"{self._agent(agent_id)}/heartbeat", body))

    def claim(self, agent_id: str) -> AgentJob | None:
        answer = self._post(f"{self._agent(agent_id)}/claim")
        return AgentJob.model_validate(answer) if answer else None

    def append_log(self, agent_id: str, job_id: str, data: bytes) -> None:
        self._post(f"{self._agent(agent_id)}/jobs/{quote(job_id, safe='')}/log", data)

    def goodbye(self, agent_id: str) -> None:
        self._post(f"{self._agent(agent_id)}/goodbye")
