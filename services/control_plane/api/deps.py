"""Annotated dependencies: what a route needs, named in its signature (and overridable in tests).

Everything hangs off `app.state.control_plane`, built once by create_app().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from services.control_plane.agents import AgentRegistry
from services.control_plane.auth import check_bearer
from services.control_plane.hidden_state_services import HiddenStateServices
from services.control_plane.prometheus import RequestMetrics
from services.control_plane.scheduler import Scheduler
from services.control_plane.service import JobService
from services.control_plane.settings import ControlPlaneSettings


@dataclass
class ControlPlane:
    """The parts of one running control plane."""

    settings: ControlPlaneSettings
    service: JobService
    scheduler: Scheduler
    request_metrics: RequestMetrics
    hidden_state_services: HiddenStateServices
    agents: AgentRegistry | None = None  # the agent executor's; None for the local executor


def get_control_plane(request: Request) -> ControlPlane:
    return request.app.state.control_plane


async def get_service(request: Request) -> JobService:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop that cost ~0.1 ms of
    # CPU per request (and more under load) for an attribute read.
    return get_control_plane(request).service


def get_agents(request: Request) -> AgentRegistry:
    agents = get_control_plane(request).agents
    if agents is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "this control plane runs trainers itself (--executor local): it has no agents",
        )
    return agents


def require_token(request: Request) -> None:
    """401/403 unless the request carries the bearer token (when one is configured)."""
    check_bearer(request, get_control_plane(request).settings.token_value)


ControlPlaneDep = Annotated[ControlPlane, Depends(get_control_plane)]
ServiceDep = Annotated[JobService, Depends(get_service)]
AgentsDep = Annotated[AgentRegistry, Depends(get_agents)]
# For `dependencies=[Authorized]` on mutating routes.
Authorized = Depends(require_token)
