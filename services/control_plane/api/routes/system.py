"""Liveness and machine-readable metrics: /healthz and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from services.control_plane import prometheus
from services.control_plane.api.deps import ControlPlaneDep
from services.control_plane.schemas import HealthPublic

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(control_plane: ControlPlaneDep) -> HealthPublic:
    """The service is up and its store answers."""
    service = control_plane.service
    busy = service.store.assigned_gpus()
    return HealthPublic(
        status="ok",
        schema_version=service.store.schema_version,
        executor=service.executor.name,
        scheduler_ticks=control_plane.scheduler.ticks,
        gpus=service.all_gpus,
        gpus_free=[g for g in service.all_gpus if g not in busy],
        auth=control_plane.settings.token is not None,
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {prometheus.CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
def metrics(control_plane: ControlPlaneDep) -> PlainTextResponse:
    """Jobs by state, GPUs, scheduler passes, and HTTP request counts and latencies, in the
    Prometheus text format."""
    service = control_plane.service
    out = prometheus.Exposition()
    prometheus.write_job_states(out, {s.value: n for s, n in service.store.count_by_state().items()})
    busy = service.store.assigned_gpus()
    prometheus.write_gauges(
        out,
        [
            ("gpus", "GPUs jobs may use.", len(service.all_gpus)),
            ("gpus_busy", "GPUs held by starting or running jobs.", len(busy & set(service.all_gpus))),
        ],
    )
    out.family("scheduler_passes_total", "counter", "Scheduler passes since the control plane started.")
    out.sample("scheduler_passes_total", control_plane.scheduler.ticks)
    control_plane.request_metrics.write(out)
    return PlainTextResponse(out.text(), media_type=prometheus.CONTENT_TYPE)
