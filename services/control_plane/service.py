"""The job lifecycle: every change to a job goes through here (routes and scheduler alike).

Routes call submit / cancel / resume / delete / record_metrics; the scheduler calls started /
finished / recover (and, for a cluster executor, submitted / cluster_progress). Each state change
is a compare-and-set in the store (store.transition), so two callers racing for one job cannot
both win; the loser sees the new state and answers 409. A queued job with a pid waits in a
cluster's queue (the slurm executor submitted it): it is cancelled through its executor and
cannot be deleted before.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from dflash_core.config import TrainConfig
from services.control_plane.events import JobEvents
from services.control_plane.executors.base import Executor, JobProgress
from services.control_plane.job_logs import JobFiles, append_line, tail
from services.control_plane.paths import (
    PATH_FIELDS,
    PathOutsideRoots,
    Roots,
    confine,
    is_local_model,
    is_path_like,
)
from services.control_plane.schemas import JobCreate, JobRecord, MetricRowIn
from services.control_plane.states import (
    ACTIONS,
    ACTIVE_STATES,
    TERMINAL_STATES,
    IllegalTransition,
    JobState,
    check_action,
)
from services.control_plane.store import JobStore
from services.hidden_states.registry import resolve

logger = logging.getLogger(__name__)
# A CPU job's trainer processes (`nproc` without GPUs): enough for any CPU host's useful
# parallelism, and no way to ask a host for thousands of processes.
MAX_CPU_PROCESSES = 16

REASON_LINES = 20  # log lines quoted in a failed job's reason
REASON_MAX_CHARS = 4000


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")


class JobRejected(ValueError):
    """A submitted job that cannot run as given (HTTP 422); `errors` as (field, message) pairs."""

    def __init__(self, errors: Sequence[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors))
        self.errors = list(errors)

    @classmethod
    def field(cls, name: str, message: str) -> JobRejected:
        return cls([((name,), message)])


class JobConflict(Exception):
    """The action is legal for the job's state but clashes with another job (HTTP 409)."""


def new_job_id() -> str:
    """Sortable by creation time and readable in a folder listing: 20261129-101500-3fa9c2."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def describe_exit(code: int) -> str:
    if code > 128:
        try:
            return f"{code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return str(code)


class JobService:
    def __init__(
        self,
        *,
        store: JobStore,
        executor: Executor,
        roots: Roots,
        all_gpus: list[int],
        jobs_dir: Path,
        events: JobEvents,
        cancel_grace_s: float,
        wake_scheduler: Callable[[], None] = lambda: None,
        agents_have_gpus: Callable[[], bool] = lambda: False,
        registry: Path | None = None,
        cluster_gpus: int = 0,
    ) -> None:
        self.store = store
        self.executor = executor
        self.roots = roots
        self.all_gpus = all_gpus
        self.jobs_dir = jobs_dir
        self.events = events
        self.cancel_grace_s = cancel_grace_s
        self.wake_scheduler = wake_scheduler
        self.agents_have_gpus = agents_have_gpus  # agent executor: does any live agent have a GPU
        self.registry = registry  # where `registry:NAME` endpoints are looked up
        self.cluster_gpus = cluster_gpus  # a cluster executor's GPUs per node for a job that gives none

    def files(self, job_id: str) -> JobFiles:
        return JobFiles.of(self.jobs_dir, job_id)

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _changed(self, job: JobRecord) -> JobRecord:
        self.events.publish(job.id)
        return job

    # ------------------------------------------------------------------ user actions
    def submit(self, body: JobCreate) -> JobRecord:
        job_id = new_job_id()
        fields = body.train_fields()
        gpus = self._gpus_for(body, fields)
        try:
            for name in PATH_FIELDS:
                if fields.get(name) is not None:
                    fields[name] = str(confine(name, fields[name], self.roots))
            if fields.get("save_path") is None:
                fields["save_path"] = str(confine("save_path", job_id, self.roots))
            # A file of prompts is data; a named set (`chitchat`) is not a path.
            if is_path_like(fields.get("eval_prompts")):
                fields["eval_prompts"] = str(confine("eval_prompts", fields["eval_prompts"], self.roots))
            verifier = fields.get("verifier_name_or_path")
            if is_local_model(verifier):
                fields["verifier_name_or_path"] = str(confine("verifier_name_or_path", verifier, self.roots))
        except PathOutsideRoots as exc:
            raise JobRejected.field(exc.field, str(exc)) from None
        # A registered name becomes its address now: the job record says where the job reads from.
        for name in ("hidden_states_endpoint", "vllm_endpoint"):
            if isinstance(fields.get(name), list):
                try:
                    fields[name] = resolve([str(e) for e in fields[name]], self.registry)
                except ValueError as exc:
                    raise JobRejected.field(name, str(exc)) from None
        if Path(fields["save_path"]) == self.roots.checkpoints:
            raise JobRejected.field(
                "save_path", "save_path is the checkpoint root itself: name a folder inside it"
            )
        if gpus == 0 and int(fields.get("nproc", 1)) > MAX_CPU_PROCESSES:
            raise JobRejected.field(
                "nproc",
                f"nproc {fields['nproc']} on CPU: at most {MAX_CPU_PROCESSES} processes without GPUs",
            )
        try:
            config = TrainConfig.model_validate(fields)
        except ValidationError as exc:
            raise JobRejected([(tuple(e["loc"]), e["msg"]) for e in exc.errors()]) from None
        holder = self._save_path_holder(Path(config.save_path), job_id)
        if holder is not None:
            raise JobRejected.field(
                "save_path",
                f"save_path {config.save_path} is in use by job {holder.id} ({holder.state.value})",
            )
        job = self.store.insert_job(
            job_id=job_id,
            name=body.name,
            config=config.model_dump(mode="json"),
            gpus_requested=gpus,
            executor=self.executor.name,
        )
        append_line(self.files(job_id).log, f"submitted{f' ({body.name})' if body.name else ''}: queued")
        self.wake_scheduler()
        return self._changed(job)

    def _gpus_for(self, body: JobCreate, fields: dict) -> int:
        """How many GPUs the job gets; one trainer process (`nproc`) per GPU."""
        nproc_given = "nproc" in body.model_fields_set
        # Else the GPUs are the agents' (known as they register), or the cluster's (per node).
        pooled = self.executor.pushes_jobs and not self.executor.cluster_queue
        if body.gpus is not None:
            gpus = body.gpus
        elif self.executor.cluster_queue:
            gpus = self.cluster_gpus
        elif self.all_gpus if pooled else self.agents_have_gpus():
            gpus = body.nproc if nproc_given else 1
        else:
            gpus = 0
        if pooled and gpus > len(self.all_gpus):
            have = f"GPUs {self.all_gpus}" if self.all_gpus else "no GPUs"
            raise JobRejected.field("gpus", f"asks for {gpus} GPUs; this control plane has {have} (--gpus)")
        if gpus > 0:
            if nproc_given and body.nproc != gpus:
                raise JobRejected.field(
                    "nproc", f"nproc {body.nproc} differs from gpus {gpus}: one process per GPU"
                )
            fields["nproc"] = gpus
        return gpus

    def _save_path_holder(self, save_path: Path, job_id: str) -> JobRecord | None:
        """Another queued or active job writing to the same folder, or to one inside it or around
        it, would clobber (or delete, on rotation) its checkpoints."""
        for other in self.store.jobs_in({JobState.QUEUED, *ACTIVE_STATES}):
            theirs = Path(other.save_path)
            nested = theirs == save_path or theirs in save_path.parents or save_path in theirs.parents
            if other.id != job_id and nested:
                return other
        return None

    def cancel(self, job_id: str) -> JobRecord:
        for _ in range(5):  # the scheduler may move the job between our read and our write
            job = self.get(job_id)
            check_action(job_id=job_id, state=job.state, action="cancel")
            now = time.time()
            if job.state == JobState.QUEUED and job.pid is None:
                done = self.store.transition(
                    job_id,
                    expect=[JobState.QUEUED],
                    unsubmitted=True,  # else a cluster executor has just submitted it
                    to=JobState.CANCELLED,
                    reason="cancelled before it started",
                    cancel_requested_at=now,
                    finished_at=now,
                )
            elif job.cancel_requested_at is not None:
                return job  # already on its way down; a second SIGTERM would skip the checkpoint
            else:  # running, or waiting in a cluster's queue: the scheduler has the executor stop it
                done = self.store.transition(
                    job_id, expect=[JobState.QUEUED, *ACTIVE_STATES], cancel_requested_at=now
                )
            if done is not None:
                append_line(self.files(job_id).log, f"cancel requested (job was {job.state.value})")
                self.wake_scheduler()
                return self._changed(done)
        raise JobConflict(f"job {job_id} kept changing state; try the cancel again")

    def resume(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        check_action(job_id=job_id, state=job.state, action="resume")
        holder = self._save_path_holder(job.save_path, job_id)
        if holder is not None:
            raise JobConflict(
                f"cannot resume job {job_id}: its save_path {job.save_path} is in use by job {holder.id} "
                f"({holder.state.value})"
            )
        done = self.store.transition(
            job_id,
            expect=ACTIONS["resume"],
            to=JobState.QUEUED,
            attempt=job.attempt + 1,
            reason=None,
            exit_code=None,
            pid=None,
            gpus=[],
            cancel_requested_at=None,
            started_at=None,
            finished_at=None,
        )
        if done is None:
            raise IllegalTransition(job_id=job_id, state=self.get(job_id).state, action="resume")
        append_line(
            self.files(job_id).log,
            f"resume requested: attempt {done.attempt} queued (continues from {job.save_path}/latest)",
        )
        self.wake_scheduler()
        return self._changed(done)

    def delete(self, job_id: str) -> None:
        """Forget the job: its record, metric rows and log. Its checkpoints stay on disk."""
        job = self.get(job_id)
        check_action(job_id=job_id, state=job.state, action="delete")
        if job.state == JobState.QUEUED and job.pid is not None:
            raise JobConflict(
                f"cannot delete job {job_id}: it waits in the cluster's queue as {self.executor.handle_noun} "
                f"{job.pid}; cancel it first"
            )
        if not self.store.delete_job(job_id, expect=ACTIONS["delete"]):
            raise IllegalTransition(job_id=job_id, state=self.get(job_id).state, action="delete")
        shutil.rmtree(self.files(job_id).folder, ignore_errors=True)
        self.events.publish(job_id)

    # ------------------------------------------------------------------ from the trainer
    def record_metrics(self, job_id: str, rows: Sequence[MetricRowIn]) -> int:
        job = self.get(job_id)
        if job.state in TERMINAL_STATES:  # its trainer posted everything before it exited
            raise JobConflict(f"job {job_id} is {job.state.value}: it takes no more metric rows")
        self.store.add_metric_rows(job_id, attempt=job.attempt, rows=rows)
        if rows:
            progress = self._progress(job, rows)
            moved = None
            if job.state == JobState.STARTING:  # the first row: the trainer is training
                moved = self.store.transition(
                    job_id, expect=[JobState.STARTING], to=JobState.RUNNING, **progress
                )
            if moved is None:
                self.store.transition(job_id, expect=list(JobState), **progress)
        self.events.publish(job_id)
        return len(rows)

    @staticmethod
    def _progress(job: JobRecord, rows: Sequence[MetricRowIn]) -> dict:
        """Step, epoch and an estimate of the run's total steps from the newest rows.

        Training rows carry a fractional `epoch`; validation rows (`val/...`) carry the epoch
        that just FINISHED, so E there means E + 1 epochs done. The baseline validation (epoch -1)
        says nothing about progress.
        """
        config = job.config
        epoch = job.epoch
        for row in rows:
            value = row.metrics.get("epoch")
            if value is None or value < 0:
                continue
            epoch = value + 1 if any(k.startswith("val/") for k in row.metrics) else value
        step = rows[-1].step
        total = None
        if epoch and epoch > 0 and step > 0:
            total = round(step * config["epochs"] / epoch)
        if config.get("max_steps"):
            total = min(total, config["max_steps"]) if total else config["max_steps"]
        return {"step": step, "epoch": epoch, "total_steps": total}

    # ------------------------------------------------------------------ from the scheduler
    def started(self, job_id: str, pid: int) -> None:
        job = self.store.transition(job_id, expect=ACTIVE_STATES, pid=pid)
        if job is not None:
            self._changed(job)

    def start_failed(self, job_id: str, reason: str) -> None:
        """The trainer could not be started (a starting job), or a cluster refused the job (a
        queued one)."""
        append_line(self.files(job_id).log, reason)
        done = self.store.transition(
            job_id,
            expect=[JobState.QUEUED, *ACTIVE_STATES],
            to=JobState.FAILED,
            reason=reason,
            finished_at=time.time(),
        )
        if done is not None:
            self._changed(done)

    def submitted(self, job_id: str, handle: int) -> bool:
        """A cluster executor submitted the queued job as `handle`; False when the job was
        cancelled or deleted meanwhile (the submission must then be withdrawn)."""
        job = self.store.transition(job_id, expect=[JobState.QUEUED], unsubmitted=True, pid=handle)
        if job is not None:
            self._changed(job)
        return job is not None

    def cluster_progress(self, progress: JobProgress) -> None:
        """What a cluster's scheduler says of a submitted job it holds: waiting (queued, with its
        reason; a job that ran before was requeued) or running."""
        job = self.store.get_job(progress.job_id)
        if job is None or job.pid is None:
            return
        files, handle = self.files(job.id), f"{self.executor.handle_noun} {job.pid}"
        if progress.running:
            if job.state == JobState.QUEUED:
                now = time.time()
                job = self.store.transition(
                    job.id, expect=[JobState.QUEUED], to=JobState.STARTING, reason=None, started_at=now
                )
                if job is None:
                    return
                append_line(files.log, f"{handle} runs on {progress.nodes or 'its nodes'}")
            if job.state == JobState.STARTING:  # the cluster's word: its trainer runs
                job = self.store.transition(job.id, expect=[JobState.STARTING], to=JobState.RUNNING)
            if job is not None:
                self._changed(job)
            return
        why = f": {progress.reason}" if progress.reason else ""
        if job.state == JobState.QUEUED:
            reason = f"waiting in the queue as {handle}{why}"
            if reason == job.reason:
                return
            append_line(files.log, reason)
            moved = self.store.transition(job.id, expect=[JobState.QUEUED], reason=reason)
        elif job.state in ACTIVE_STATES:
            reason = (
                f"requeued as {handle} (preempted, or a node failed); it resumes from its last checkpoint "
                f"when it runs again{why}"
            )
            append_line(files.log, reason)
            moved = self.store.transition(job.id, expect=ACTIVE_STATES, to=JobState.QUEUED, reason=reason)
        else:
            return
        if moved is not None:
            self._changed(moved)

    def finished(
        self,
        job_id: str,
        exit_code: int | None,
        *,
        note: str = "",
        state: JobState | None = None,
        reason: str | None = None,
    ) -> None:
        """The job's trainer ended with `exit_code` (None: unknown); set the end state. `state`
        and `reason`: the executor's verdict (a cluster's TIMEOUT, a scancel from outside), which
        decides unless the job was being cancelled."""
        job = self.store.get_job(job_id)
        if job is None:
            return
        if job.state == JobState.QUEUED and job.pid is not None:  # ended in a cluster's queue
            if job.cancel_requested_at is not None:
                state, reason = JobState.CANCELLED, "cancelled before it started"
            elif state is None:  # it ran, and ended between two looks: a run goes through starting
                job = self.store.transition(
                    job_id, expect=[JobState.QUEUED], to=JobState.STARTING, started_at=time.time()
                )
                if job is None:
                    return
        elif job.state not in ACTIVE_STATES:
            return
        if state is None or (job.cancel_requested_at is not None and job.state in ACTIVE_STATES):
            state, reason = self._outcome(job, exit_code)
        elif state == JobState.FAILED:
            reason = f"{reason}. Its log ends:\n{self._log_end(job)}"[-REASON_MAX_CHARS:]
        reason = f"{reason}{note}" if reason else (note.strip("; ") or None)
        status = "unknown" if exit_code is None else describe_exit(exit_code)
        ended = f"trainer exited with status {status}"
        if job.state == JobState.QUEUED:  # it never ran
            exit_code, ended = None, f"{self.executor.handle_noun} {job.pid} ended before it ran"
        # Logged before the state changes: a log follower stops at the end state, after this line.
        append_line(self.files(job_id).log, f"{ended}: job {state.value}")
        done = self.store.transition(
            job_id,
            # A late metric row may move a starting job to running meanwhile: either is fine.
            expect=ACTIVE_STATES if job.state in ACTIVE_STATES else [job.state],
            to=state,
            reason=reason,
            exit_code=exit_code,
            finished_at=time.time(),
        )
        if done is not None:
            self._changed(done)

    def _log_end(self, job: JobRecord) -> str:
        """The trainer's last lines in the job's log (the control plane's own left out)."""
        lines = [line for line in tail(self.files(job.id).log, 200) if not line.startswith("[control plane")]
        return "\n".join(line[:500] for line in lines[-REASON_LINES:])

    def _outcome(self, job: JobRecord, code: int | None) -> tuple[JobState, str | None]:
        if code == 0:
            late = job.cancel_requested_at is not None
            return JobState.SUCCEEDED, ("the run finished before the cancel took effect" if late else None)
        if job.cancel_requested_at is not None:
            if code == 128 + signal.SIGTERM and job.state == JobState.STARTING:
                # SIGTERM before the trainer's stop handler was up (loading, waiting for the
                # hidden-state service): the default action, and nothing trained to save.
                return JobState.CANCELLED, "cancelled before its first step (exit 143)"
            if code == 128 + signal.SIGTERM:
                return (
                    JobState.CANCELLED,
                    "cancelled: the trainer stopped after writing a checkpoint (exit 143)",
                )
            if code == 128 + signal.SIGKILL:
                return JobState.CANCELLED, (
                    f"cancelled: the trainer did not stop within {self.cancel_grace_s:.0f} s and was killed; "
                    "steps since its last checkpoint are lost"
                )
            status = "unknown" if code is None else describe_exit(code)
            return JobState.CANCELLED, f"cancelled (trainer exit status {status})"
        if code is None:
            return JobState.FAILED, (
                f"trainer process {job.pid} ended while the control plane was away; "
                "its exit status is unknown"
            )
        reason = f"trainer exited with status {describe_exit(code)}:\n{self._log_end(job)}"
        return JobState.FAILED, reason[-REASON_MAX_CHARS:]

    def recover(self) -> None:
        """At start: adopt live trainers of starting/running jobs, settle the rest. Queued jobs
        need nothing: the scheduler starts them as usual. (Under a cluster executor every job the
        cluster may hold is watched again, queued ones included; the next poll says how each is.)"""
        if self.executor.cluster_queue:
            self._recover_cluster_jobs()
            return
        for job in self.store.jobs_in(ACTIVE_STATES):
            if job.agent_id is not None:
                # Its agent's next heartbeat settles it (still running, ended, or never started),
                # or the agent stays silent and is declared lost.
                append_line(
                    self.files(job.id).log,
                    f"control plane restarted: waiting for agent {job.agent_id} to report on it",
                )
            elif (pid := self.executor.attach(job)) is not None:
                if pid != job.pid:  # started just before the control plane stopped: store it now
                    self.started(job.id, pid)
                append_line(self.files(job.id).log, f"control plane restarted: re-attached to process {pid}")
                logger.info("job %s: re-attached to its trainer process %d", job.id, pid)
            elif job.pid is None:
                self.fail(job.id, "control plane restarted before the trainer process was started")
            else:
                code = self.files(job.id).read_exit_status()
                if code is not None:  # it ended while we were away, and said how
                    self.finished(job.id, code, note="; ended while the control plane was away")
                else:
                    self.fail(job.id, f"control plane restarted; trainer process {job.pid} not found")

    def _recover_cluster_jobs(self) -> None:
        noun = self.executor.handle_noun
        for job in self.store.jobs_in([JobState.QUEUED, *ACTIVE_STATES]):
            handle = self.executor.attach(job)
            if handle is None:
                if job.state != JobState.QUEUED:  # never happens: a job is submitted while queued
                    self.fail(job.id, f"control plane restarted; no {noun} known for it")
                continue  # never submitted: the scheduler submits it
            if job.pid is None:  # submitted just before the control plane stopped: store it now
                self.store.transition(job.id, expect=[job.state], unsubmitted=True, pid=handle)
            append_line(self.files(job.id).log, f"control plane restarted: re-attached to {noun} {handle}")
            logger.info("job %s: re-attached to %s %d", job.id, noun, handle)

    def fail(self, job_id: str, reason: str) -> None:
        """End an active job whose trainer's fate is unknown: failed (resumable from its last
        checkpoint), or cancelled when a cancel was already asked for."""
        job = self.store.get_job(job_id)
        if job is None or job.state not in ACTIVE_STATES:
            return
        state = JobState.CANCELLED if job.cancel_requested_at is not None else JobState.FAILED
        append_line(self.files(job_id).log, f"{reason}: job {state.value}")
        done = self.store.transition(
            job_id, expect=ACTIVE_STATES, to=state, reason=reason, finished_at=time.time()
        )
        if done is not None:
            logger.warning("job %s: %s", job_id, reason)
            self._changed(done)
