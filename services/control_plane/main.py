"""`create_app(settings)`: the control plane's FastAPI app, ready for uvicorn.

    uvicorn.run(create_app(ControlPlaneSettings(db="jobs.db")), host="127.0.0.1", port=8600)
    dflash control-plane --db jobs.db ...            (services/cli/control_plane.py does this)

The store is opened and migrated here, so a bad database fails at once; the lifespan settles
jobs left over from a previous run (re-attach or fail, see JobService.recover) and runs the
scheduler. Stopping the app leaves running trainers alone: the next start re-attaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.control_plane.agents import AgentNotFound, AgentRegistry
from services.control_plane.api.deps import ControlPlane
from services.control_plane.api.routes import agents as agent_routes
from services.control_plane.api.routes import checkpoints, hidden_states, jobs, logs, meta, metrics, system
from services.control_plane.auth import RequireToken
from services.control_plane.browser_guard import BrowserGuard, allowed_hosts
from services.control_plane.checkpoints import CheckpointNotFound
from services.control_plane.events import JobEvents
from services.control_plane.executors.agent import AgentExecutor
from services.control_plane.executors.base import Executor
from services.control_plane.executors.local import LocalExecutor
from services.control_plane.executors.slurm import SlurmExecutor
from services.control_plane.executors.slurm_script import SlurmOptions
from services.control_plane.gpus import detect_gpus
from services.control_plane.hidden_state_services import HiddenStateServices
from services.control_plane.limits import BodySizeLimit, route_limits
from services.control_plane.paths import Roots
from services.control_plane.prometheus import RequestMetrics, RequestMetricsMiddleware
from services.control_plane.scheduler import Scheduler
from services.control_plane.service import JobConflict, JobNotFound, JobRejected, JobService
from services.control_plane.settings import ControlPlaneSettings
from services.control_plane.states import IllegalTransition
from services.control_plane.store import JobStore
from services.control_plane.stream_limits import StreamLimit

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Submit DFlash training jobs, watch them live, cancel, resume, and download their checkpoints.

A job is a `dflash train` config (the same fields, defaults and checks) plus `name` and `gpus`.
States: `queued → starting → running → succeeded | failed | cancelled`; `resume` re-queues a
failed or cancelled job, which continues from its last checkpoint.

When the control plane has a token, every route but `/healthz` and the dashboard's files needs
`Authorization: Bearer <token>` (401 without it, 403 with a wrong one or one outside its scope):
the admin token reaches everything, an agent token the agent routes, a trainer token only its
own job's metric POST.
"""


def _errors(loc_prefix: tuple[str, ...], errors: list[tuple[tuple, str]]) -> list[dict]:
    return [{"loc": [*loc_prefix, *loc], "msg": msg, "type": "value_error"} for loc, msg in errors]


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(JobNotFound)
    async def _not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(AgentNotFound)
    async def _no_agent(_request: Request, exc: AgentNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(CheckpointNotFound)
    async def _no_checkpoint(_request: Request, exc: CheckpointNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(IllegalTransition)
    async def _illegal(_request: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc), "state": exc.state.value, "action": exc.action}, status_code=409
        )

    @app.exception_handler(JobConflict)
    async def _conflict(_request: Request, exc: JobConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(JobRejected)
    async def _rejected(_request: Request, exc: JobRejected) -> JSONResponse:
        return JSONResponse({"detail": _errors(("body",), exc.errors)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own shape, minus `input`: the offending value is not echoed back (it could
        # be large, or something secret pasted into the wrong field).
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)


def create_app(settings: ControlPlaneSettings) -> FastAPI:
    store = JobStore(settings.database_url)
    jobs_dir = settings.resolved_jobs_dir
    jobs_dir.mkdir(parents=True, exist_ok=True)
    roots = Roots.of(
        data=settings.data_root, checkpoints=settings.checkpoint_root, models=tuple(settings.model_roots)
    )
    roots.checkpoints.mkdir(parents=True, exist_ok=True)
    if settings.executor == "slurm":
        all_gpus = []  # Slurm gives jobs their nodes' GPUs; this host's are none of theirs
    else:
        all_gpus = settings.gpus if settings.gpus is not None else detect_gpus()
    events = JobEvents()
    credentials = settings.credentials()
    executor: Executor
    if settings.executor == "agent":
        executor = AgentExecutor()
    elif settings.executor == "slurm":
        # The folders a job's paths may name: mounted at their own paths in a container.
        mounts = (jobs_dir, roots.data, roots.checkpoints, *roots.models)
        executor = SlurmExecutor(
            options=SlurmOptions.from_settings(settings, mounts=mounts),
            jobs_dir=jobs_dir,
            control_plane_url=settings.own_url,
            token_for=lambda job: credentials.trainer_token(job.id, job.attempt),
            poll_interval_s=settings.slurm_poll_interval_s,
        )
    else:
        executor = LocalExecutor(
            jobs_dir=jobs_dir,
            python=settings.python,
            control_plane_url=settings.own_url,
            token_for=lambda job: credentials.trainer_token(job.id, job.attempt),
        )
    service = JobService(
        store=store,
        executor=executor,
        roots=roots,
        all_gpus=all_gpus,
        jobs_dir=jobs_dir,
        events=events,
        cancel_grace_s=settings.cancel_grace_s,
        registry=settings.hidden_states_registry,
        cluster_gpus=settings.slurm_gpus_per_node,
    )
    agents = None
    if settings.executor == "agent":
        agents = AgentRegistry(
            service=service,
            heartbeat_interval_s=settings.agent_heartbeat_interval_s,
            lost_after_s=settings.agent_lost_after_s,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            trainer_token=credentials.trainer_token,
        )
        service.agents_have_gpus = agents.any_live_with_gpus
    scheduler = Scheduler(
        agents=agents,
        service=service,
        executor=executor,
        max_concurrent_jobs=settings.max_concurrent_jobs,
        cancel_grace_s=settings.cancel_grace_s,
        poll_interval_s=settings.poll_interval_s,
        max_log_bytes=settings.max_log_bytes,
    )
    service.wake_scheduler = scheduler.wake
    request_metrics = RequestMetrics()
    hidden_state_services = HiddenStateServices(
        configured=settings.hidden_states_endpoint_list,
        max_job_endpoints=settings.max_probed_job_endpoints,
        registry=settings.hidden_states_registry,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        events.bind(asyncio.get_running_loop())
        await asyncio.to_thread(service.recover)
        task = asyncio.create_task(scheduler.run(), name="scheduler")
        logger.info(
            "control plane on %s: store %s (schema v%d), jobs dir %s, %s, auth %s",
            settings.own_url,
            store.engine.url.render_as_string(hide_password=True),
            store.schema_version,
            jobs_dir,
            f"GPUs {all_gpus or 'none'}" if agents is None else "trainers run by agents",
            "on" if settings.token is not None else "off",
        )
        try:
            yield
        finally:
            scheduler.stop()
            await task
            hidden_state_services.close()
            store.close()

    app = FastAPI(title="dflash control plane", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.control_plane = ControlPlane(
        settings=settings,
        service=service,
        scheduler=scheduler,
        request_metrics=request_metrics,
        hidden_state_services=hidden_state_services,
        agents=agents,
    )
    for module in (jobs, metrics, logs, checkpoints, agent_routes, hidden_states, meta, system):
        app.include_router(module.router)
    from services.control_plane.dashboard import mount_dashboard  # the web UI at / (static files)

    mount_dashboard(app)
    add_error_handlers(app)
    # Added last = outermost: the size limit applies before anything reads the body, the stream
    # caps before a stream starts, the token before both (a stranger's body is never read, whatever
    # its size, nor does a stranger hold a stream slot), and the request metrics time everything,
    # 401s, 413s and 429s included.
    app.add_middleware(
        BodySizeLimit,
        limit_for=route_limits(default=settings.max_body_bytes, metrics=settings.max_metrics_body_bytes),
    )
    app.add_middleware(StreamLimit, per_client=settings.max_streams_per_client, total=settings.max_streams)
    app.add_middleware(
        RequireToken,
        credentials=credentials,
        routes=app.routes,
        attempt_of=lambda job_id: job.attempt if (job := store.get_job(job_id)) else None,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=request_metrics)
    hosts = allowed_hosts(
        bind_host=settings.host, public_url=settings.public_url, extra=settings.allowed_hosts.split(",")
    )
    app.add_middleware(BrowserGuard, token_set=settings.token is not None, hosts=hosts)
    return app
