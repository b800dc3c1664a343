"""A job's metric rows: the trainer posts them; people read the history or follow them live (SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.control_plane import public_json
from services.control_plane.api import sse
from services.control_plane.api.deps import Authorized, ServiceDep
from services.control_plane.schemas import MetricsAccepted, MetricsIn, MetricsPublic
from services.control_plane.service import JobNotFound, JobService
from services.control_plane.states import TERMINAL_STATES
from services.control_plane.store import StoredMetricRow

router = APIRouter(prefix="/v1/jobs/{job_id}/metrics", tags=["metrics"])

STREAM_BATCH = 1000  # rows read from the store per pass of a stream


@router.post("", dependencies=[Authorized], responses={404: {"description": "No such job"}})
def post_metrics(job_id: str, body: MetricsIn, service: ServiceDep) -> MetricsAccepted:
    """Metric rows from the job's trainer (its control-plane sink posts them in order). The first
    row moves a `starting` job to `running`; each updates the job's step, epoch and total."""
    return MetricsAccepted(accepted=service.record_metrics(job_id, body.rows))


@router.get("", response_model=MetricsPublic, responses={404: {"description": "No such job"}})
async def get_metrics(
    job_id: str,
    service: ServiceDep,
    since_step: Annotated[int | None, Query(ge=0, description="Only rows with step >= this.")] = None,
    after_id: Annotated[int | None, Query(ge=0, description="Only rows with id > this (to page on).")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000, description="At most this many rows.")] = 10_000,
) -> Response:
    """The job's metric rows in arrival order (every attempt; `attempt` tells them apart)."""

    def read(at_most: int) -> list[StoredMetricRow]:
        return service.store.metric_rows(job_id, since_step=since_step, after_id=after_id, limit=at_most)

    def write(rows: list[StoredMetricRow]) -> str:
        if not rows:
            service.get(job_id)  # 404 for no such job; rows are deleted with their job, so any prove it
        return public_json.metrics_page_json(job_id, rows)

    return await public_json.answer_rows(service.store, read=read, write=write, limit=limit)


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def stream_metrics(
    job_id: str,
    service: ServiceDep,
    since_step: Annotated[int | None, Query(ge=0, description="Start with rows with step >= this.")] = None,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this row id (EventSource).")
    ] = None,
) -> StreamingResponse:
    """Live metric rows as Server-Sent Events: the rows so far, then each new one as it arrives.

    Events: `metrics` (data: one row as JSON, id: the row id), `job` (data: the job, whenever its
    state changes), `end` (the job finished or was deleted; the stream closes). A comment line
    every 15 s keeps proxies from closing an idle stream."""
    await run_in_threadpool(service.get, job_id)  # 404 before the stream starts
    return StreamingResponse(
        _metric_events(service, job_id, since_step=since_step, after_id=sse.last_event_id(last_event_id)),
        media_type="text/event-stream",
        headers=sse.SSE_HEADERS,
    )


async def _metric_events(
    service: JobService, job_id: str, *, since_step: int | None, after_id: int | None
) -> AsyncIterator[str]:
    last_state = None
    quiet_s = 0.0
    while True:
        waiter = service.events.waiter(job_id)  # before reading: a later change wakes us
        try:
            job = await run_in_threadpool(service.get, job_id)
        except JobNotFound:
            yield sse.event(json.dumps({"job_id": job_id, "state": None}), name="end")
            return
        if job.state != last_state:
            last_state = job.state
            yield sse.event(public_json.job_json(job), name="job")
        while True:
            rows = await run_in_threadpool(
                service.store.metric_rows,
                job_id,
                since_step=since_step,
                after_id=after_id,
                limit=STREAM_BATCH,
            )
            for row in rows:
                yield sse.event(public_json.metric_row_json(job_id, row), name="metrics", event_id=row.id)
                after_id = row.id
            if len(rows) < STREAM_BATCH:
                break
        if job.state in TERMINAL_STATES:
            # Rows are stored before the trainer exits, so none can follow a terminal state (a
            # resume starts a new attempt: reconnect with Last-Event-ID to follow it).
            yield sse.event(json.dumps({"job_id": job_id, "state": job.state.value}), name="end")
            return
        # Re-read at least every second: another control plane on the same database wakes nobody.
        await service.events.wait(waiter, timeout_s=1.0)
        quiet_s = 0.0 if waiter.is_set() else quiet_s + 1.0
        if quiet_s >= sse.KEEPALIVE_S:
            quiet_s = 0.0
            yield sse.KEEPALIVE
