"""Trainer agents: register, claim jobs, heartbeat, ship logs (services/control_plane/agents.py).

With a token configured, each route takes the admin token or an agent's (services/control_plane/
access.py): an agent runs trainers with the control plane's jobs, so an impostor must not claim
them, and an agent's token speaks for that agent only.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Response, status

from services.control_plane.api.deps import AgentsDep, Authorized, PrincipalDep
from services.control_plane.schemas import AgentHeartbeat, AgentJob, AgentOrders, AgentPublic, AgentRegister

router = APIRouter(prefix="/v1/agents", tags=["agents"])

AGENT_ERRORS = {
    401: {"description": "Token missing"},
    403: {"description": "Wrong token"},
    404: {"description": "No such agent (register first)"},
}


@router.get("")
def list_agents(agents: AgentsDep) -> list[AgentPublic]:
    """Every agent that ever registered: live, lost or gone, with its GPUs and jobs."""
    return agents.list_public()


@router.get("/{agent_id}", responses={404: {"description": "No such agent"}})
def get_agent(agent_id: str, agents: AgentsDep) -> AgentPublic:
    return agents.public(agents.get(agent_id))


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Authorized], responses=AGENT_ERRORS)
def register_agent(body: AgentRegister, agents: AgentsDep, principal: PrincipalDep) -> AgentPublic:
    """Register an agent and its GPUs. Registering again under the same name (a restart) keeps
    its identity and its jobs; the first heartbeat then says which of them it still runs."""
    if not principal.speaks_for_agent(body.name):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this agent token belongs to agent {principal.agent!r}, not {body.name!r}",
        )
    return agents.public(agents.register(body))


@router.post("/{agent_id}/heartbeat", dependencies=[Authorized], responses=AGENT_ERRORS)
def heartbeat(agent_id: str, body: AgentHeartbeat, agents: AgentsDep) -> AgentOrders:
    """The agent's trainers: those running (job id → pid) and those that ended. The answer
    lists the jobs to stop."""
    return agents.heartbeat(agent_id, body)


@router.post(
    "/{agent_id}/claim",
    dependencies=[Authorized],
    response_model=AgentJob,
    responses={**AGENT_ERRORS, 204: {"description": "Nothing it can run now"}},
)
def claim(agent_id: str, agents: AgentsDep) -> AgentJob | Response:
    """The oldest queued job that fits the agent's free GPUs, now `starting` on them."""
    job = agents.claim(agent_id)
    return job if job is not None else Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{agent_id}/jobs/{job_id}/log",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Authorized],
    responses={**AGENT_ERRORS, 409: {"description": "Not this agent's job"}},
)
def append_log(
    agent_id: str,
    job_id: str,
    agents: AgentsDep,
    data: Annotated[bytes, Body(media_type="application/octet-stream")],
) -> Response:
    """Output of the job's trainer, appended to its log as it comes."""
    if not data:
        raise HTTPException(422, "empty log chunk")
    agents.append_log(agent_id, job_id, data)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{agent_id}/goodbye",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Authorized],
    responses=AGENT_ERRORS,
)
def goodbye(agent_id: str, agents: AgentsDep) -> Response:
    """A clean shutdown: the agent is `gone`, not lost; jobs it still held fail (resumable)."""
    agents.goodbye(agent_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
