"""The scheduler: one loop that starts queued jobs, collects exits and sees cancels through.

Each pass (every --poll-interval-s, or at once when a route wakes it):
1. exits: jobs whose trainer ended get their end state (service.finished);
2. lost agents (agent executor): agents silent too long lose their jobs (agents.py);
3. cancels: a cancel-requested job's trainer gets SIGTERM, and SIGKILL once --cancel-grace-s
   has passed since the request (the request time is stored, so a restart keeps the deadline);
   agents get these orders in their heartbeat's answer instead;
4. logs: an active job's log past --max-log-bytes keeps its newest half;
5. starts (local executor; agents claim jobs themselves): queued jobs, oldest first, while fewer
   than --max-concurrent-jobs are active and the job's GPU count is free. A job that does not
   fit is passed over for a later one that does (a big job can wait behind a stream of small
   ones; first come first served would idle GPUs).

GPUs are assigned from the store (GPUs of starting/running jobs are busy) and the claim is a
compare-and-set queued → starting, so no GPU is ever given to two jobs.

A cluster executor (slurm) differs in 1, 3 and 5: its poll also says which submitted jobs wait
(queued, with the cluster's reason) and which run; cancels reach jobs waiting in the cluster's
queue too; and a start is a submission: queued jobs not yet submitted are, oldest first, while
fewer than --max-concurrent-jobs are submitted or active. The cluster gives out nodes and GPUs;
the job keeps `queued` under its cluster job id (the compare-and-set stores it only on a job still
queued and unsubmitted; one cancelled or deleted meanwhile gets its submission withdrawn).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from services.control_plane.agents import AgentRegistry
from services.control_plane.executors.base import Executor, ExecutorError, JobProgress
from services.control_plane.gpus import pick_gpus
from services.control_plane.job_logs import trim
from services.control_plane.schemas import JobRecord
from services.control_plane.service import JobService
from services.control_plane.states import ACTIVE_STATES, JobState

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        *,
        service: JobService,
        executor: Executor,
        max_concurrent_jobs: int,
        cancel_grace_s: float,
        poll_interval_s: float,
        max_log_bytes: int,
        agents: AgentRegistry | None = None,
    ) -> None:
        self.service = service
        self.store = service.store
        self.executor = executor
        self.max_concurrent_jobs = max_concurrent_jobs
        self.cancel_grace_s = cancel_grace_s
        self.poll_interval_s = poll_interval_s
        self.max_log_bytes = max_log_bytes
        self.agents = agents
        self.ticks = 0
        self._killed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    # ------------------------------------------------------------------ one pass
    def tick(self) -> None:
        for report in self.executor.poll():
            if isinstance(report, JobProgress):
                self.service.cluster_progress(report)
                continue
            self._killed.discard(report.job_id)
            self.service.finished(report.job_id, report.exit_code, state=report.state, reason=report.reason)
        if self.agents is not None:
            self.agents.settle_lost()
        active = self.store.jobs_in(ACTIVE_STATES)
        queued = self.store.jobs_in([JobState.QUEUED]) if self.executor.cluster_queue else []
        submitted = [job for job in queued if job.pid is not None]  # waiting in the cluster's queue
        now = time.time()
        for job in [*submitted, *active]:
            if job.cancel_requested_at is not None and job.pid is not None:
                self.executor.cancel(job)
                if now - job.cancel_requested_at > self.cancel_grace_s and job.id not in self._killed:
                    self._killed.add(job.id)
                    self.executor.kill(job)
        for job in active:
            trim(self.service.files(job.id).log, self.max_log_bytes)
        if self.executor.cluster_queue:
            self._submit_queued([job for job in queued if job.pid is None], len(submitted) + len(active))
        elif self.executor.pushes_jobs:  # else agents claim queued jobs themselves
            self._start_queued(len(active))
        self.ticks += 1

    def _submit_queued(self, unsubmitted: list[JobRecord], submitted: int) -> None:
        """Hand queued jobs to the cluster's scheduler, oldest first, up to --max-concurrent-jobs."""
        for job in unsubmitted:
            if submitted >= self.max_concurrent_jobs:
                return
            try:
                handle = self.executor.start(job)
            except (ExecutorError, OSError, ValueError) as exc:
                logger.warning("job %s could not be submitted: %s", job.id, exc)
                self.service.start_failed(job.id, f"the job could not be submitted: {exc}")
                continue
            submitted += 1
            if self.service.submitted(job.id, handle):
                logger.info("job %s submitted as %s %d", job.id, self.executor.handle_noun, handle)
            else:  # cancelled or deleted while it was being submitted
                self.executor.kill(dataclasses.replace(job, pid=handle))

    def _start_queued(self, active: int) -> None:
        busy = self.store.assigned_gpus()
        for job in self.store.jobs_in([JobState.QUEUED]):
            if active >= self.max_concurrent_jobs:
                return
            gpus = pick_gpus(all_gpus=self.service.all_gpus, busy=busy, count=job.gpus_requested)
            if gpus is None:
                continue
            claimed = self.store.transition(
                job.id, expect=[JobState.QUEUED], to=JobState.STARTING, gpus=gpus, started_at=time.time()
            )
            if claimed is None:
                continue  # cancelled or deleted since we listed it
            busy.update(gpus)
            active += 1
            try:
                pid = self.executor.start(claimed)
            except (ExecutorError, OSError, ValueError) as exc:
                logger.warning("job %s could not start: %s", job.id, exc)
                self.service.start_failed(job.id, f"the trainer could not be started: {exc}")
                continue
            logger.info("job %s started: pid %d, GPUs %s", job.id, pid, gpus or "none")
            self.service.started(job.id, pid)

    # ------------------------------------------------------------------ the loop
    def wake(self) -> None:
        """Run a pass soon (thread-safe): a job was submitted, cancelled or resumed."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(event.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not self._stopping:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:  # one bad pass (a database hiccup) must not end scheduling for good
                logger.exception("scheduler pass failed; retrying in %.1f s", self.poll_interval_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stopping = True
        self.wake()
