"""The `agent` executor: trainers run on trainer hosts, under `dflash trainer-agent`s.

Nothing is pushed from here: agents claim queued jobs, report exits and pids in their
heartbeats, and take stop orders from the heartbeat's answer (control_plane/agents.py). This
class only fills the executor's place in the scheduler, which then never starts a job itself.
"""

from __future__ import annotations

from services.control_plane.executors.base import ExecutorError, ProcessExit
from services.control_plane.schemas import JobRecord


class AgentExecutor:
    name = "agent"
    pushes_jobs = False
    cluster_queue = False
    handle_noun = "process"

    def start(self, job: JobRecord) -> int:
        raise ExecutorError("with the agent executor, trainer agents claim jobs; nothing is started here")

    def cancel(self, job: JobRecord) -> None:
        """Delivered as a `cancel` order on the agent's next heartbeat."""

    def kill(self, job: JobRecord) -> None:
        """Delivered as a `kill` order on the agent's next heartbeat."""

    def poll(self) -> list[ProcessExit]:
        return []  # exits arrive in heartbeats, straight to the job service

    def attach(self, job: JobRecord) -> int | None:
        return None  # nothing runs here: a claimed job's agent reports on it, or is declared lost
