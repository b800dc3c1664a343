"""A job's checkpoints: list them, download one as a tar.gz stream."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.control_plane.api.deps import Authorized, ServiceDep
from services.control_plane.checkpoints import archive_stream, checkpoint_folder, list_checkpoints
from services.control_plane.schemas import CheckpointsPublic

router = APIRouter(prefix="/v1/jobs/{job_id}/checkpoints", tags=["checkpoints"])


@router.get("", responses={404: {"description": "No such job"}})
def get_checkpoints(job_id: str, service: ServiceDep) -> CheckpointsPublic:
    """The checkpoint folders in the job's save_path (epoch folders and the newest step folder),
    oldest first, with their step and validation loss, and where `latest` and `checkpoint_best`
    point."""
    job = service.get(job_id)
    found, links = list_checkpoints(job.save_path)
    return CheckpointsPublic(
        job_id=job_id, save_path=str(job.save_path), data=found, latest=links["latest"],
        checkpoint_best=links["checkpoint_best"],
    )  # fmt: skip


@router.get(
    "/{name}/archive",
    dependencies=[Authorized],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "The folder as a tar.gz"},
        401: {"description": "Token missing"},
        403: {"description": "Wrong token"},
        404: {"description": "No such job or checkpoint"},
    },
)
async def download_checkpoint(job_id: str, name: str, service: ServiceDep) -> StreamingResponse:
    """One checkpoint folder as a tar.gz, streamed (`name`: a folder from the list, `latest` or
    `checkpoint_best`). It unpacks to `<name>/config.json, model.safetensors, ...`, which
    `vllm serve <name>` loads."""
    job = await run_in_threadpool(service.get, job_id)
    folder = await run_in_threadpool(checkpoint_folder, job.save_path, name)
    return StreamingResponse(
        archive_stream(folder, arcname=name),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}.tar.gz"'},
    )
