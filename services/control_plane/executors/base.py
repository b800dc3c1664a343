"""The executor protocol: what the scheduler needs from whatever runs trainers.

The scheduler owns the job states and the GPU assignment (both in the store); an executor only
starts, signals and watches processes. Every method is called from the scheduler's one thread.

An executor that hands jobs to a cluster's scheduler (`cluster_queue`, slurm.py) starts a job by
submitting it: the job stays `queued` under the cluster's id (stored as its pid) until the
cluster runs it, and poll() reports what the cluster says of its jobs (JobProgress) besides how
they ended (ProcessExit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dflash_core.config import TrainConfig
from services.control_plane.schemas import JobRecord
from services.control_plane.states import JobState


class TrainerJob(Protocol):
    """What starting a trainer needs to know of a job: a JobRecord, or the AgentJob an agent got."""

    id: str
    attempt: int
    gpus: list[int]
    pid: int | None

    def train_config(self) -> TrainConfig: ...


@dataclass(frozen=True)
class ProcessExit:
    """A job's trainer ended. `exit_code` is 128+N for signal N; None when nobody knows it.

    `state` and `reason`: set when the end says more than its exit status (a cluster's TIMEOUT or
    NODE_FAIL, a scancel from outside); they decide the job's end state unless the job was being
    cancelled."""

    job_id: str
    exit_code: int | None
    state: JobState | None = None
    reason: str | None = None


@dataclass(frozen=True)
class JobProgress:
    """What a cluster's scheduler says of a job it still holds (cluster_queue executors only):
    waiting (`running` False, with the scheduler's `reason`) or running (on `nodes`)."""

    job_id: str
    running: bool
    reason: str | None = None
    nodes: str | None = None


class ExecutorError(RuntimeError):
    """A trainer could not be started (the job fails with this message)."""


class Executor(Protocol):
    name: str
    # True: the scheduler starts queued jobs through start(). False: trainers are started by
    # whoever claims the job (trainer agents), and stop orders travel on their heartbeats.
    pushes_jobs: bool
    # True: start() submits to a cluster's scheduler, which queues the job and gives out its
    # nodes and GPUs; the job stays `queued`, under the id start() returned, until poll() says it
    # runs. False: start() starts the trainer on GPUs assigned here.
    cluster_queue: bool
    # What start() returns the id of, for people: "process", "Slurm job".
    handle_noun: str

    def start(self, job: JobRecord) -> int:
        """Start `job`'s trainer on `job.gpus` (already assigned), or submit it to the cluster;
        returns the pid (cluster job id) the job is tracked by. Raises ExecutorError when it
        cannot."""
        ...

    def cancel(self, job: JobRecord) -> None:
        """Ask the trainer to stop after a checkpoint (SIGTERM). Safe to call again: only the
        first request reaches the trainer (a second SIGTERM would kill it without one)."""
        ...

    def kill(self, job: JobRecord) -> None:
        """Stop the trainer now (SIGKILL to everything it started): the cancel's grace ran out."""
        ...

    def poll(self) -> list[ProcessExit | JobProgress]:
        """Trainers that ended since the last call (and, from a cluster_queue executor, the
        cluster's word on the jobs it still holds)."""
        ...

    def attach(self, job: JobRecord) -> int | None:
        """After a control-plane restart: watch `job`'s process again if it is alive and is this
        job's trainer, and return its pid; None when it is gone. A job with no stored pid (the
        control plane stopped between starting its trainer and storing the pid) is looked for by
        its id, so that a resume can never start a second trainer beside a live one."""
        ...
