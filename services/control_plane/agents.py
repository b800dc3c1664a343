"""Trainer agents, as the control plane sees them: registration, heartbeats, claims, lost agents.

An agent (`dflash trainer-agent`, services/agent/) runs on a trainer host and pulls work:

    POST /v1/agents                      register (again after a restart: same name, same id)
    POST /v1/agents/{id}/claim           the oldest queued job that fits its free GPUs, or 204
    POST /v1/agents/{id}/heartbeat       {running: {job: pid}, exits: [...]} -> {cancel, kill}
    POST /v1/agents/{id}/jobs/{job}/log  the trainer's output, appended to the job's log
    POST /v1/agents/{id}/goodbye         a clean shutdown

The agent's loop is serial (claim, start, heartbeat, ...), so every heartbeat sent after a claim
lists the claimed job as running or exited: an active job of the agent that is in neither is
gone (the agent restarted without it) and fails at once. An agent silent for longer than
`lost_after_s` is lost: its jobs fail with the reason and can be resumed, on any agent, from
their last checkpoint (checkpoints live on storage the agents share). If it comes back, its
heartbeat revives it and any trainer it still runs for a job that is no longer its own is
killed, so two trainers never write one save_path.

GPU indices are per agent host; a GPU is busy while a starting or running job of that agent
holds it, so no GPU is ever given to two jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from services.control_plane.gpus import pick_gpus
from services.control_plane.job_logs import append_line
from services.control_plane.schemas import (
    AgentHeartbeat,
    AgentJob,
    AgentOrders,
    AgentPublic,
    AgentRecord,
    AgentRegister,
    AgentState,
    JobRecord,
)
from services.control_plane.service import JobConflict, JobService
from services.control_plane.states import ACTIVE_STATES, TERMINAL_STATES, JobState

logger = logging.getLogger(__name__)

# How long after a job ends its agent may still send the trainer's last log lines.
LATE_LOG_S = 120.0


class AgentNotFound(LookupError):
    def __init__(self, agent_id: str) -> None:
        super().__init__(f"no agent {agent_id}: register first (POST /v1/agents)")


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class AgentRegistry:
    def __init__(
        self,
        *,
        service: JobService,
        heartbeat_interval_s: float,
        lost_after_s: float,
        max_concurrent_jobs: int,
        trainer_token: Callable[[str, int], str | None],
    ) -> None:
        """`trainer_token(job_id, attempt)`: the token a claimed job's trainer gets (credentials.py)."""
        self.service = service
        self.trainer_token = trainer_token
        self.store = service.store
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lost_after_s = lost_after_s
        self.max_concurrent_jobs = max_concurrent_jobs
        # Silence is counted from our own start at the earliest: agents could not reach a control
        # plane that was down, and must not be declared lost the moment it is back.
        self.started_at = time.time()
        # Claims read then write (free GPUs, the concurrency cap): one at a time in this process.
        self._claim_lock = threading.Lock()

    # ------------------------------------------------------------------ views
    def list_public(self) -> list[AgentPublic]:
        active = self.store.jobs_in(ACTIVE_STATES)
        return [self.public(agent, active=active) for agent in self.store.list_agents()]

    def _jobs_of(self, agent_id: str) -> list[JobRecord]:
        return [job for job in self.store.jobs_in(ACTIVE_STATES) if job.agent_id == agent_id]

    def public(self, agent: AgentRecord, *, active: list[JobRecord] | None = None) -> AgentPublic:
        """`active`: the starting and running jobs, when the caller has them (one query for a list)."""
        if active is None:
            active = self.store.jobs_in(ACTIVE_STATES)
        jobs = [job for job in active if job.agent_id == agent.id]
        return AgentPublic(
            id=agent.id,
            name=agent.name,
            host=agent.host,
            gpus=agent.gpus,
            gpus_busy=sorted({gpu for job in jobs for gpu in job.gpus}),
            max_jobs=agent.max_jobs,
            state=agent.state,
            jobs=[job.id for job in jobs],
            registered_at=_utc(agent.registered_at),
            last_seen_at=_utc(agent.last_seen_at),
            heartbeat_interval_s=self.heartbeat_interval_s,
            lost_after_s=self.lost_after_s,
        )

    def get(self, agent_id: str) -> AgentRecord:
        agent = self.store.get_agent(agent_id)
        if agent is None:
            raise AgentNotFound(agent_id)
        return agent

    def any_live_with_gpus(self) -> bool:
        return any(a.gpus for a in self.store.list_agents() if a.state == AgentState.LIVE)

    # ------------------------------------------------------------------ the protocol
    def register(self, body: AgentRegister) -> AgentRecord:
        previous = self.store.get_agent(body.name)
        agent = self.store.upsert_agent(
            agent_id=body.name, name=body.name, host=body.host, gpus=body.gpus, max_jobs=body.max_jobs
        )
        again = f" again (was {previous.state.value})" if previous is not None else ""
        logger.info(
            "agent %s registered%s: host %s, GPUs %s", agent.id, again, agent.host, agent.gpus or "none"
        )
        self.service.wake_scheduler()
        return agent

    def _seen(self, agent_id: str) -> AgentRecord:
        """The agent spoke: it is live (again) as of now."""
        agent = self.get(agent_id)
        self.store.set_agent(agent_id, state=AgentState.LIVE, last_seen_at=time.time())
        if agent.state != AgentState.LIVE:
            logger.warning("agent %s is back (was %s)", agent_id, agent.state.value)
        return agent

    def heartbeat(self, agent_id: str, body: AgentHeartbeat) -> AgentOrders:
        agent = self._seen(agent_id)
        exited = set()
        for ended in body.exits:
            job = self.store.get_job(ended.job_id)
            if job is None or job.agent_id != agent_id:
                continue  # deleted, or already settled and resumed elsewhere
            exited.add(job.id)
            if ended.exit_code is None and ended.note:
                self.service.fail(job.id, f"agent {agent.name}: {ended.note}")  # e.g. it could not start
            else:
                self.service.finished(job.id, ended.exit_code, note=f"; {ended.note}" if ended.note else "")
        orders = AgentOrders()
        mine = {job.id: job for job in self._jobs_of(agent_id)}
        for job_id, pid in body.running.items():
            job = mine.get(job_id)
            if job is None:
                # Not this agent's to run any more: it was lost and the job failed (and was
                # perhaps resumed elsewhere), or the job was deleted. Stop it before it writes
                # into a save_path another trainer may own now.
                orders.kill.append(job_id)
            elif job.pid != pid:
                self.service.started(job_id, pid)
        now = time.time()
        for job in mine.values():
            if job.id in exited:
                continue
            if job.id not in body.running:
                self.service.fail(job.id, f"agent {agent.name} no longer runs its trainer (it restarted?)")
            elif job.cancel_requested_at is not None:
                overdue = now - job.cancel_requested_at > self.service.cancel_grace_s
                (orders.kill if overdue else orders.cancel).append(job.id)
        return orders

    def claim(self, agent_id: str) -> AgentJob | None:
        """The oldest queued job this agent can run now (moved to `starting` and assigned its
        GPUs), or None."""
        with self._claim_lock:
            agent = self._seen(agent_id)
            active = self.store.jobs_in(ACTIVE_STATES)
            mine = [job for job in active if job.agent_id == agent_id]
            if len(active) >= self.max_concurrent_jobs or len(mine) >= agent.max_jobs:
                return None
            busy = {gpu for job in mine for gpu in job.gpus}
            for job in self.store.jobs_in([JobState.QUEUED]):
                gpus = pick_gpus(all_gpus=agent.gpus, busy=busy, count=job.gpus_requested)
                if gpus is None:
                    continue
                claimed = self.store.transition(
                    job.id,
                    expect=[JobState.QUEUED],
                    to=JobState.STARTING,
                    gpus=gpus,
                    agent_id=agent_id,
                    pid=None,
                    started_at=time.time(),
                )
                if claimed is None:
                    continue  # cancelled or deleted since we listed it
                append_line(
                    self.service.files(job.id).log,
                    f"attempt {claimed.attempt}: claimed by agent {agent.name} "
                    f"({agent.host or 'host unknown'}) on its GPUs [{','.join(map(str, gpus))}]",
                )
                self.service.events.publish(job.id)
                return AgentJob(
                    id=claimed.id,
                    attempt=claimed.attempt,
                    gpus=gpus,
                    config=claimed.config,
                    trainer_token=self.trainer_token(claimed.id, claimed.attempt),
                )
        return None

    def append_log(self, agent_id: str, job_id: str, data: bytes) -> None:
        self.get(agent_id)
        job = self.service.get(job_id)
        if job.agent_id != agent_id:
            raise JobConflict(f"job {job_id} is not run by agent {agent_id}")
        # An agent sends a trainer's last lines after it reports the exit; past that, a finished
        # job's log is closed.
        ended = job.finished_at if job.state in TERMINAL_STATES else None
        if ended is not None and time.time() - ended > LATE_LOG_S:
            raise JobConflict(f"job {job_id} is {job.state.value}: its log takes no more lines")
        with open(self.service.files(job_id).log, "ab") as log:
            log.write(data)
        self.service.events.publish(job_id)

    def goodbye(self, agent_id: str) -> None:
        agent = self._seen(agent_id)
        self.store.set_agent(agent_id, state=AgentState.GONE)
        for job in self._jobs_of(agent_id):
            self.service.fail(job.id, f"agent {agent.name} shut down while the job was active")
        logger.info("agent %s said goodbye", agent_id)

    # ------------------------------------------------------------------ from the scheduler
    def settle_lost(self) -> None:
        """Agents silent past lost_after_s are lost; their jobs fail (resumable elsewhere)."""
        now = time.time()
        for agent in self.store.list_agents():
            if agent.state != AgentState.LIVE:
                continue
            silent = now - max(agent.last_seen_at, self.started_at)
            if silent <= self.lost_after_s:
                continue
            if not self.store.set_agent(agent.id, expect=[AgentState.LIVE], state=AgentState.LOST):
                continue  # it spoke in the meantime
            logger.warning("agent %s lost: no heartbeat for %.0f s", agent.id, silent)
            for job in self._jobs_of(agent.id):
                self.service.fail(
                    job.id,
                    f"lost: trainer agent {agent.name} sent no heartbeat for {silent:.0f} s "
                    f"(lost after {self.lost_after_s:.0f} s); resume the job to continue from its last "
                    f"checkpoint in {job.save_path} on any agent",
                )
