"""The hidden-state services jobs read from, with their gRPC health (hidden_state_services.py)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from services.control_plane.api.deps import ControlPlaneDep
from services.control_plane.schemas import HiddenStateServicePublic
from services.control_plane.states import ACTIVE_STATES, JobState

router = APIRouter(prefix="/v1/hidden-state-services", tags=["hidden-state services"])


@router.get("")
async def list_hidden_state_services(control_plane: ControlPlaneDep) -> list[HiddenStateServicePublic]:
    """Every service named by `--hidden-states-endpoints` or by a queued or active job: its gRPC
    health (`serving`, `not_serving`, `unreachable`), what it serves (verifier, layer ids,
    dtype) and which jobs read from it. Of the services only jobs name, the first
    `--max-probed-job-endpoints` are checked."""
    # async: the probes run on their own pool, awaited without holding one of the server's threads.
    jobs = await run_in_threadpool(control_plane.service.store.jobs_in, [JobState.QUEUED, *ACTIVE_STATES])
    return await control_plane.hidden_state_services.list(jobs)
