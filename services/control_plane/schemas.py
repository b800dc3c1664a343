"""What goes over HTTP, one schema per direction, and the stored job record.

    JobCreate      POST /v1/jobs body: a TrainConfig plus `name` and `gpus`
    JobRecord      a row of the jobs table, as the service and executors see it
    JobPublic      one job as the API returns it; JobsPublic a page of them
    MetricsIn      the trainer's metric POST (services/trainer/metric_sinks/control_plane.py)
    Agent...       the trainer agents' protocol (register, heartbeat, claim; services/agent/)
    MetaPublic     what the dashboard reads instead of repeating it (states, the example config)
    ...Public      everything else the API returns

The job spec IS `dflash_core.config.TrainConfig` (one config, written once): the same fields, defaults and
checks as `dflash train`, unknown fields refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dflash_core.config import TrainConfig
from services.control_plane.states import JobState

# TrainConfig fields the control plane fills in itself when it launches the trainer.
CONTROL_PLANE_OWNED = ("control_plane_url", "job_id")


class JobCreate(TrainConfig):
    """A training job: every `dflash train` field (same names, defaults and checks), plus `name`
    and `gpus`. `save_path` may be left out: the job then writes to `<checkpoint-root>/<job id>`.
    Paths must lie under the control plane's data and checkpoint roots."""

    name: str | None = Field(default=None, max_length=200, description="A label for people; not unique.")
    gpus: int | None = Field(
        default=None,
        ge=0,
        description="GPUs this job needs (one trainer process each, `--nproc`); default: `nproc`, or 0 "
        "on a control plane without GPUs. 0 = CPU only.",
    )
    save_path: Path | None = Field(  # type: ignore[assignment]  # optional here, required on TrainConfig
        default=None,
        description="Checkpoint folder under the checkpoint root; default `<checkpoint-root>/<job id>`.",
    )

    @field_validator(*CONTROL_PLANE_OWNED)
    @classmethod
    def _set_by_the_control_plane(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("set by the control plane when it starts the trainer; leave it out")
        return value

    def train_fields(self) -> dict[str, Any]:
        """The TrainConfig part of the body with every default filled in: the job keeps the values
        it was submitted with, whatever a later release changes."""
        return self.model_dump(mode="json", exclude={"name", "gpus"})


@dataclass
class JobRecord:
    """A row of the jobs table. `config_json` is the TrainConfig JSON as stored (resolved paths)."""

    id: str
    seq: int
    name: str | None
    state: JobState
    reason: str | None
    config_json: str
    gpus_requested: int
    gpus: list[int]
    executor: str
    pid: int | None
    exit_code: int | None
    attempt: int
    step: int | None
    total_steps: int | None
    epoch: float | None
    cancel_requested_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    agent_id: str | None = None  # the agent running it (agent executor); None for local jobs
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def config(self) -> dict[str, Any]:
        # Parsed on first use: a page of jobs answered from `config_json` never needs it.
        return json.loads(self.config_json)

    @property
    def save_path(self) -> Path:
        return Path(self.config["save_path"])

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.config)


def _utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


class JobPublic(BaseModel):
    """One job as the API shows it."""

    id: str
    name: str | None
    state: JobState
    reason: str | None = Field(description="Why the job is in its state (failure tail, cancel, restart).")
    config: TrainConfig = Field(description="The job's training config, paths resolved.")
    gpus_requested: int
    gpus: list[int] = Field(
        description="GPU indices assigned while it starts or runs (CUDA_VISIBLE_DEVICES)."
    )
    executor: str
    agent_id: str | None = Field(
        default=None, description="The trainer agent running it (agent executor); null for local jobs."
    )
    pid: int | None = Field(
        description="The job's process (its process group leader) while active; under the slurm "
        "executor its Slurm job id, from its submission on (while it waits in Slurm's queue too)."
    )
    exit_code: int | None = Field(description="The trainer's exit status; 143 = stopped by SIGTERM.")
    attempt: int = Field(description="1, plus one per resume.")
    step: int | None = Field(description="Newest global step reported by the trainer.")
    total_steps: int | None = Field(
        description="Estimated steps of the whole run, from the reported epoch fraction (or max_steps)."
    )
    epoch: float | None = Field(description="Fractional epoch of the newest report.")
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: JobRecord) -> JobPublic:
        return cls(config=job.train_config(), **cls.fields_of(job))

    @staticmethod
    def fields_of(job: JobRecord) -> dict[str, Any]:
        """Every field but `config`, from the record (public_json.py writes them without a model)."""
        return {
            "id": job.id,
            "name": job.name,
            "state": job.state,
            "reason": job.reason,
            "gpus_requested": job.gpus_requested,
            "gpus": job.gpus,
            "executor": job.executor,
            "agent_id": job.agent_id,
            "pid": job.pid,
            "exit_code": job.exit_code,
            "attempt": job.attempt,
            "step": job.step,
            "total_steps": job.total_steps,
            "epoch": job.epoch,
            "cancel_requested": job.cancel_requested_at is not None,
            "created_at": _utc(job.created_at),
            "updated_at": _utc(job.updated_at),
            "started_at": _utc(job.started_at),
            "finished_at": _utc(job.finished_at),
        }


class JobsPublic(BaseModel):
    """A page of jobs, newest first."""

    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filter, over all pages.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


# ---------------------------------------------------------------------- metrics
class MetricRowIn(BaseModel):
    """One row as the trainer's control-plane sink sends it."""

    # Extra keys are ignored rather than refused: the trainer treats a 4xx as final and stops
    # sending, so a newer trainer adding a key must not lose every metric of its run.
    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0, description="Global optimizer step.")
    time: float = Field(description="Unix time the row was logged, seconds.")
    metrics: dict[str, float | None] = Field(description="Name → value; null for NaN or Inf.")


class MetricsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rows: list[MetricRowIn] = Field(max_length=100_000)


class MetricsAccepted(BaseModel):
    accepted: int


class MetricRowPublic(BaseModel):
    id: int = Field(description="Increasing per job; the SSE event id.")
    attempt: int = Field(description="The job attempt that logged it (a resume repeats steps).")
    step: int
    time: float
    metrics: dict[str, float | None]


class MetricsPublic(BaseModel):
    job_id: str
    data: list[MetricRowPublic]
    count: int


# ---------------------------------------------------------------------- checkpoints
class CheckpointPublic(BaseModel):
    name: str = Field(description="Folder name under save_path: an epoch (`0`, `1`, ...) or `step-<n>`.")
    kind: Literal["epoch", "step"]
    epoch: int | None = Field(description="The epoch folder's number (the epoch it finished).")
    step: int | None = Field(description="`global_step` from its training_state.json.")
    val_loss: float | None = Field(description="Validation loss at that epoch's end (epoch folders).")
    size_bytes: int
    modified_at: datetime


class CheckpointsPublic(BaseModel):
    job_id: str
    save_path: str
    data: list[CheckpointPublic]
    latest: str | None = Field(description="Folder `latest` points at (what a resume continues from).")
    checkpoint_best: str | None = Field(description="Folder `checkpoint_best` points at (lowest val loss).")


# ---------------------------------------------------------------------- system
class HealthPublic(BaseModel):
    status: Literal["ok"]
    schema_version: int
    executor: str
    scheduler_ticks: int = Field(description="Scheduler passes since start (each starts what fits).")
    gpus: list[int]
    gpus_free: list[int]
    auth: bool = Field(description="Whether a bearer token is required on mutating routes.")


class MetaPublic(BaseModel):
    """What the dashboard takes from the server rather than repeating it (GET /v1/meta)."""

    job_states: list[JobState] = Field(description="Every job state, in lifecycle order.")
    active_states: list[JobState] = Field(description="States whose job may have a process (GPUs busy).")
    terminal_states: list[JobState] = Field(description="States a job has ended in.")
    not_copied: list[str] = Field(
        description="Config fields that belong to one job (set by the control plane, or per job): a "
        "clone leaves them out."
    )
    example_config: dict[str, Any] = Field(description="A small job that runs on CPU: the form's example.")


# ---------------------------------------------------------------------- trainer agents
class AgentState(str, Enum):
    LIVE = "live"  # heartbeating
    LOST = "lost"  # silent past --agent-timeout-s: its jobs were failed (resumable elsewhere)
    GONE = "gone"  # said goodbye on a clean shutdown


@dataclass
class AgentRecord:
    """A row of the agents table."""

    id: str
    name: str
    host: str
    gpus: list[int]
    max_jobs: int
    state: AgentState
    registered_at: float
    last_seen_at: float


class AgentRegister(BaseModel):
    """`dflash trainer-agent` introducing itself (again, after a restart: same name, same id)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$", description="Unique per agent (hostname)."
    )
    host: str = Field(default="", max_length=200, description="Where it runs, for people.")
    gpus: list[int] = Field(default_factory=list, max_length=1024, description="GPU indices on its host.")
    max_jobs: int = Field(default=1, ge=1, le=1024, description="Jobs it runs at once.")

    @field_validator("gpus")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(g < 0 for g in value):
            raise ValueError(f"GPU indices must be distinct and >= 0, got {value}")
        return value


class AgentPublic(BaseModel):
    id: str
    name: str
    host: str
    gpus: list[int]
    gpus_busy: list[int] = Field(description="GPUs held by its starting or running jobs.")
    max_jobs: int
    state: AgentState
    jobs: list[str] = Field(description="Its starting or running jobs.")
    registered_at: datetime
    last_seen_at: datetime
    heartbeat_interval_s: float = Field(description="How often it should heartbeat.")
    lost_after_s: float = Field(description="Silence after which it is lost and its jobs fail.")


class AgentExit(BaseModel):
    job_id: str
    exit_code: int | None = Field(description="128+N for signal N; null when unknown.")
    note: str | None = Field(default=None, max_length=2000, description="Why, when the agent knows.")


class AgentHeartbeat(BaseModel):
    """What an agent runs now (job id → pid) and which of its trainers ended since it last said."""

    model_config = ConfigDict(extra="forbid")

    running: dict[str, int] = Field(default_factory=dict, max_length=1024)
    exits: list[AgentExit] = Field(default_factory=list, max_length=1024)


class AgentOrders(BaseModel):
    """The answer to a heartbeat: jobs to stop. `cancel`: SIGTERM once (the trainer checkpoints);
    `kill`: SIGKILL now (the cancel's grace ran out, or the job is no longer this agent's)."""

    cancel: list[str] = Field(default_factory=list)
    kill: list[str] = Field(default_factory=list)


class AgentJob(BaseModel):
    """A job an agent claimed: everything it needs to start the trainer."""

    id: str
    attempt: int
    gpus: list[int] = Field(description="Indices on the agent's host (CUDA_VISIBLE_DEVICES).")
    config: dict[str, Any] = Field(description="The TrainConfig, as stored.")
    pid: int | None = None
    trainer_token: str | None = Field(
        default=None,
        description="The token the trainer posts this attempt's metrics with (into its environment, "
        "nowhere else); null when the control plane has no token.",
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.config)


# ---------------------------------------------------------------------- hidden-state services
class ServiceInfoPublic(BaseModel):
    """What a hidden-state service serves (its GetInfo)."""

    verifier: str
    backend: str
    architecture: str
    num_layers: int
    hidden_size: int
    layer_ids: list[int] = Field(description="Layer ids it serves (the targets and the last layer).")
    dtype: str
    max_length: int
    server_version: str


class HiddenStateServicePublic(BaseModel):
    endpoint: str = Field(description="host:port of its gRPC server.")
    configured: bool = Field(description="Named by --hidden-states-endpoints (else only by jobs).")
    registered_as: str | None = Field(
        default=None, description="Its name in --hidden-states-registry (jobs write `registry:NAME`)."
    )
    jobs: list[str] = Field(description="Queued, starting or running jobs that read from it.")
    status: Literal["serving", "not_serving", "unreachable", "error"] = Field(
        description="gRPC health of its HiddenStates service; `unreachable`: no connection."
    )
    detail: str | None = Field(description="Why it is not serving, when it says or we know.")
    info: ServiceInfoPublic | None = Field(description="Its GetInfo, when it answered.")
    checked_at: float = Field(description="Unix time of the check (answers are cached ~2 s).")


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)
