"""Jobs: submit, list, get, cancel, resume, delete. Thin: validation and lifecycle live in JobService."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from services.control_plane import public_json
from services.control_plane.api.deps import Authorized, ServiceDep
from services.control_plane.schemas import JobCreate, JobPublic, JobsPublic
from services.control_plane.states import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_ERRORS = {404: {"description": "No such job"}, 409: {"description": "Not allowed in the job's state"}}
AUTH_ERRORS = {401: {"description": "Token missing"}, 403: {"description": "Wrong token"}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Authorized],
    responses={**AUTH_ERRORS, 413: {"description": "Body too large"}, 422: {"description": "Invalid job"}},
)
def submit_job(body: JobCreate, service: ServiceDep, response: Response) -> JobPublic:
    """Queue a training job. The body is a `dflash train` config (same fields, defaults and checks;
    unknown fields are refused) plus `name` and `gpus`; paths must lie under the control plane's
    data and checkpoint roots."""
    job = service.submit(body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic)
async def list_jobs(
    service: ServiceDep,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in these states (repeatable).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Jobs per page.")] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    offset: Annotated[
        int | None, Query(ge=0, description="Skip this many jobs (instead of a cursor).")
    ] = None,
) -> Response:
    """Jobs, newest first. Page with `cursor` (stable while jobs are added) or `offset`."""
    if cursor is not None and offset is not None:
        raise HTTPException(422, "give `cursor` or `offset`, not both")
    before = None
    if cursor is not None:
        if not cursor.isdigit():
            raise HTTPException(422, f"cursor {cursor!r} is not one this API returned")
        before = int(cursor)

    def page() -> str:
        # One row more than asked for says whether another page exists.
        rows, count = service.store.list_jobs(
            states=state, limit=limit + 1, before_seq=before, offset=offset or 0
        )
        more, rows = len(rows) > limit, rows[:limit]
        next_cursor = str(rows[-1].seq) if more else None
        return public_json.jobs_page_json(rows, count=count, next_cursor=next_cursor)

    return await public_json.answer(service.store, page)  # limit <= 500 rows


@router.get("/{job_id}", response_model=JobPublic, responses=JOB_ERRORS)
async def get_job(job_id: str, service: ServiceDep) -> Response:
    """One job: state, reason, progress, config, assigned GPUs."""
    return await public_json.answer(service.store, lambda: public_json.job_json(service.get(job_id)))


@router.post("/{job_id}/cancel", dependencies=[Authorized], responses={**JOB_ERRORS, **AUTH_ERRORS})
def cancel_job(job_id: str, service: ServiceDep) -> JobPublic:
    """Cancel a queued, starting or running job. A running trainer gets SIGTERM, writes a
    checkpoint and exits (the job then becomes `cancelled`); after the grace period it is killed.
    Repeating the call changes nothing."""
    return JobPublic.of(service.cancel(job_id))


@router.post("/{job_id}/resume", dependencies=[Authorized], responses={**JOB_ERRORS, **AUTH_ERRORS})
def resume_job(job_id: str, service: ServiceDep) -> JobPublic:
    """Queue a failed or cancelled job again; its trainer continues from `<save_path>/latest`."""
    return JobPublic.of(service.resume(job_id))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Authorized],
    responses={**JOB_ERRORS, **AUTH_ERRORS},
)
def delete_job(job_id: str, service: ServiceDep) -> Response:
    """Forget a job that is not starting or running: its record, metric rows and log. Its
    checkpoints stay on disk."""
    service.delete(job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
