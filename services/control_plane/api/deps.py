"""Annotated dependencies: what a route needs, named in its signature (and overridable in tests).

Everything hangs off `app.state.control_plane`, built once by create_app().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from services.control_plane.agents import AgentRegistry
from services.control_plane.auth import NEEDS_TOKEN, principal_of
from services.control_plane.credentials import ADMIN, Principal
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


async def get_principal(request: Request) -> Principal:
    """Who sent the request, as the auth middleware found it (the admin when there is no token)."""
    principal = principal_of(request.scope)
    if principal is not None:
        return principal
    if get_control_plane(request).settings.token is not None:
        # The middleware passed nothing on: never treat that as allowed (a wiring mistake).
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, NEEDS_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return ADMIN


async def require_token(request: Request) -> None:
    """A second line behind the auth middleware (auth.py), which checks every route: a route
    marked with it is refused if the middleware did not run. (async, as the others: no thread hop.)"""
    await get_principal(request)


ControlPlaneDep = Annotated[ControlPlane, Depends(get_control_plane)]
ServiceDep = Annotated[JobService, Depends(get_service)]
AgentsDep = Annotated[AgentRegistry, Depends(get_agents)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
# For `dependencies=[Authorized]` on mutating routes.
Authorized = Depends(require_token)
