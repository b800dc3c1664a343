"""A job's log: the trainer's output plus the control plane's own lines about the job."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.control_plane.api import sse
from services.control_plane.api.deps import ServiceDep
from services.control_plane.job_logs import read_from, tail_with_offset
from services.control_plane.service import JobNotFound, JobService
from services.control_plane.states import TERMINAL_STATES

router = APIRouter(prefix="/v1/jobs/{job_id}/logs", tags=["logs"])

FOLLOW_POLL_S = 0.5  # the trainer writes the file directly; nobody announces a new line


@router.get(
    "",
    response_class=PlainTextResponse,
    response_model=None,
    responses={
        200: {"content": {"text/plain": {}, "text/event-stream": {}}, "description": "Log lines"},
        404: {"description": "No such job"},
    },
)
async def get_logs(
    job_id: str,
    service: ServiceDep,
    lines: Annotated[int, Query(ge=0, le=10_000, description="Lines from the end of the log.")] = 100,
    follow: Annotated[
        bool, Query(description="Keep the response open and send new lines as they come.")
    ] = False,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> PlainTextResponse | StreamingResponse:
    """The last `lines` lines of the job's log (progress bars as a terminal shows them). With
    `follow=true` new lines follow until the job ends: plain text in chunks (`curl -N`), or
    Server-Sent Events (`log` events, id = byte offset) when the request accepts
    `text/event-stream`."""
    await run_in_threadpool(service.get, job_id)
    path = service.files(job_id).log
    shown, offset = await run_in_threadpool(tail_with_offset, path, lines)
    if not follow:
        return PlainTextResponse("".join(f"{line}\n" for line in shown))
    as_sse = "text/event-stream" in (accept or "")
    return StreamingResponse(
        _follow(service, job_id, shown, offset, as_sse=as_sse),
        media_type="text/event-stream" if as_sse else "text/plain; charset=utf-8",
        headers=sse.SSE_HEADERS,
    )


async def _follow(
    service: JobService, job_id: str, first: list[str], offset: int, *, as_sse: bool
) -> AsyncIterator[str]:
    def out(batch: list[str], end_offset: int) -> str:
        if as_sse:
            return "".join(sse.event(line, name="log", event_id=end_offset) for line in batch)
        return "".join(f"{line}\n" for line in batch)

    if first:
        yield out(first, offset)
    path = service.files(job_id).log
    quiet_s = 0.0
    while True:
        try:
            job = await run_in_threadpool(service.get, job_id)
        except JobNotFound:
            return
        batch, offset = await run_in_threadpool(read_from, path, offset)
        if batch:
            quiet_s = 0.0
            yield out(batch, offset)
            continue
        if job.state in TERMINAL_STATES:  # read once more after the end state: nothing was missed
            if as_sse:
                yield sse.event(job.state.value, name="end")
            return
        waiter = service.events.waiter(job_id)
        await service.events.wait(waiter, timeout_s=FOLLOW_POLL_S)
        quiet_s += FOLLOW_POLL_S
        if as_sse and quiet_s >= sse.KEEPALIVE_S:
            quiet_s = 0.0
            yield sse.KEEPALIVE
