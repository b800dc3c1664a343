"""Which token may call which route: one table, and every route it does not name is admin-only.

    OPEN        no token: liveness (`/healthz`) and the dashboard's static page and files
    AGENT       any agent token: registering (the name is checked against the token once the
                body is read, in the route)
    AGENT_SELF  the token of the agent named in the path: heartbeat, claim, log upload (of its own
                jobs: the registry refuses others with 409), goodbye, and reading its own record
    TRAINER     the trainer token of the job (and attempt) named in the path: posting its metrics
    ADMIN       the admin token only: everything else, including any route added later

The admin token passes everywhere. A route is named by its method and path template, as
FastAPI declares it; HEAD is treated as GET.
"""

from __future__ import annotations

from enum import Enum

from services.control_plane.credentials import Principal, Role
from services.control_plane.dashboard import ASSET_ROUTE, PAGES


class Access(Enum):
    OPEN = "open"
    ADMIN = "admin"
    AGENT = "agent"
    AGENT_SELF = "agent_self"
    TRAINER = "trainer"


RULES: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access.OPEN,
    ("GET", ASSET_ROUTE): Access.OPEN,
    **{("GET", page): Access.OPEN for page in PAGES},
    ("POST", "/v1/agents"): Access.AGENT,
    ("GET", "/v1/agents/{agent_id}"): Access.AGENT_SELF,
    ("POST", "/v1/agents/{agent_id}/heartbeat"): Access.AGENT_SELF,
    ("POST", "/v1/agents/{agent_id}/claim"): Access.AGENT_SELF,
    ("POST", "/v1/agents/{agent_id}/jobs/{job_id}/log"): Access.AGENT_SELF,
    ("POST", "/v1/agents/{agent_id}/goodbye"): Access.AGENT_SELF,
    ("POST", "/v1/jobs/{job_id}/metrics"): Access.TRAINER,
    # Named although ADMIN is the default: the dashboard's data is the API's, not an open file.
    ("GET", "/v1/meta"): Access.ADMIN,
}

_SCOPES = {
    Role.AGENT: "an agent token is good for the agent routes only (register, heartbeat, claim, "
    "log upload, goodbye, its own record)",
    Role.TRAINER: "a trainer token is good only for posting its own job's metrics",
}


def access_for(method: str, path_template: str | None) -> Access:
    """The rule for a route; ADMIN for a path no route matches (a 404 is no one else's business)."""
    method = "GET" if method == "HEAD" else method
    if path_template is None:
        return Access.ADMIN
    return RULES.get((method, path_template), Access.ADMIN)


def refusal(
    principal: Principal, access: Access, params: dict[str, str], *, method: str, path: str
) -> str | None:
    """Why `principal` may not make this request (its 403 detail), or None when it may. A
    trainer's attempt is checked apart (trainer_attempt_refusal): it needs the job's record."""
    if principal.role is Role.ADMIN or access is Access.OPEN:
        return None
    if principal.role is Role.AGENT:
        if access is Access.AGENT:
            return None
        if access is Access.AGENT_SELF:
            agent_id = params.get("agent_id", "")
            if principal.speaks_for_agent(agent_id):
                return None
            return f"this agent token belongs to agent {principal.agent!r}, not {agent_id!r}"
    if principal.role is Role.TRAINER and access is Access.TRAINER:
        if params.get("job_id") == principal.job_id:
            return None
        return f"this trainer token belongs to job {principal.job_id}, not {params.get('job_id')!r}"
    return f"{_SCOPES[principal.role]}, not {method} {path}"


def trainer_attempt_refusal(principal: Principal, current_attempt: int | None) -> str | None:
    """A trainer token of an earlier attempt (a trainer that outlived its attempt) is refused."""
    if principal.role is not Role.TRAINER or current_attempt is None or principal.attempt == current_attempt:
        return None
    return (
        f"this trainer token is for attempt {principal.attempt} of job {principal.job_id}, which is "
        f"at attempt {current_attempt} now"
    )
