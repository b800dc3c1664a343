"""The `slurm` executor: each job is a Slurm batch job; Slurm queues it, gives it nodes and runs it.

    sbatch --parsable <jobs-dir>/<id>/job.sbatch         (slurm_script.py writes the script)

- start: write the trainer's config and the batch script into the job's folder and submit it. The
  job stays `queued` under its Slurm job id (stored as its pid) until Slurm runs it.
- states: every --slurm-poll-interval-s, ONE `squeue` for all of this control plane's Slurm jobs:
  PENDING (and requeued) → queued with Slurm's reason, RUNNING → running, an end state → the
  job's end state. How it ended comes from `scontrol show job` (once per job), else `sacct` (one
  call for all that squeue forgot), else the `exit_status` the script writes.
- cancel: `scancel --signal=TERM <id>` signals every process of the running step, torchrun and its
  ranks on every node: the trainer checkpoints and exits (services/trainer/stop_signals.py takes
  torchrun's forwarded copy of the signal as the same request). Not `--batch`: the batch shell
  would have to pass it on through srun, which takes SIGTERM as "kill the step now". A marker
  file makes it once per Slurm job, restarts included. After --cancel-grace-s, plain `scancel`.
  A job still pending is dropped from the queue with `scancel --state=PENDING`.
- log: Slurm writes the script's output to slurm-<id>.out in the job's folder (on the shared file
  system); each scheduler pass appends its new complete lines to the job's log. The offset read
  so far is kept in slurm-<id>.out.read, so a restarted control plane neither repeats nor skips.
- restart: attach() tracks the stored Slurm job ids again; a job submitted by a control plane
  that stopped before it stored the id is found by its job name (dflash-<id>.<attempt>).

The trainer's token travels in the environment sbatch exports to the job (kept by slurmctld,
never in the script or its output); the jobs folder, data and checkpoint roots must be on a file
system every node and the control plane share, at the same paths.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dflash_core.atomic_files import write_text
from services.control_plane.executors.base import ExecutorError, JobProgress, ProcessExit, TrainerJob
from services.control_plane.executors.slurm_script import SCRIPT_NAME, SlurmOptions, job_name, render
from services.control_plane.executors.trainer_setup import trainer_environment, write_trainer_config
from services.control_plane.job_logs import JobFiles, append_line
from services.control_plane.schemas import JobRecord
from services.control_plane.states import JobState

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0  # a slurmctld that does not answer in this long is treated as a failed call
COPY_MAX_BYTES = 4 << 20  # output copied into the job log per pass and job: a pass stays short
NAME_CACHE_S = 30.0  # job names listed once for all the jobs one restart looks for

# squeue's %T values. Anything else (a state a newer Slurm adds) counts as running.
WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
ENDED = {
    "COMPLETED": "",
    "FAILED": "",
    "CANCELLED": "",
    "TIMEOUT": "it ran past its time limit (--time); the trainer was sent SIGTERM at the limit and "
    "had the cluster's KillWait to checkpoint",
    "NODE_FAIL": "a node of the job failed",
    "BOOT_FAIL": "a node of the job failed to boot",
    "PREEMPTED": "it was preempted, and not requeued",
    "OUT_OF_MEMORY": "a process of the job ran out of memory",
    "DEADLINE": "it missed its --deadline",
    "REVOKED": "a federated sibling of it ran instead",
}


def exit_status(code: str) -> int | None:
    """Slurm's `ExitCode=A:S` (script status A, or killed by signal S) as a shell reports it."""
    status, _, sig = code.partition(":")
    try:
        return 128 + int(sig) if int(sig or 0) else int(status)
    except ValueError:
        return None


@dataclass(frozen=True)
class QueueRow:
    state: str
    reason: str | None  # why it waits (or why it ended); None when Slurm gives none
    nodes: str


@dataclass(frozen=True)
class Ending:
    state: str
    exit_code: int | None


class SlurmOutput:
    """Slurm's output file of one Slurm job, copied line by line into the job's log."""

    def __init__(self, files: JobFiles, slurm_id: int) -> None:
        self.path = files.folder / f"slurm-{slurm_id}.out"
        self.mark = files.folder / f"slurm-{slurm_id}.out.read"
        self.log = files.log
        try:
            self.offset = int(self.mark.read_text().strip())
        except (OSError, ValueError):
            self.offset = 0

    def copy(self, *, final: bool = False) -> None:
        """Append the complete lines written since the last call (`final`: the rest as well)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(COPY_MAX_BYTES)
        except FileNotFoundError:  # not running yet (or the shared file system has not shown it)
            return
        if not final:
            data = data[: data.rfind(b"\n") + 1]
        if not data:
            return
        try:
            with open(self.log, "ab") as log:
                log.write(data if data.endswith(b"\n") else data + b"\n")
        except OSError as exc:
            logger.warning("job log %s: cannot append Slurm's output (%s)", self.log, exc.strerror or exc)
            return
        self.offset += len(data)
        write_text(self.mark, f"{self.offset}\n")


@dataclass
class Tracked:
    slurm_id: int
    output: SlurmOutput
    reported: tuple[bool, str | None] | None = None  # the last JobProgress (running, reason) sent


def run_slurm(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A Slurm command; raises ExecutorError when it cannot be run or does not answer."""
    try:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExecutorError(f"{args[0]}: {exc}") from None


def submission_environment(token: str | None) -> dict[str, str]:
    """What sbatch exports to the job: the trainer's environment, less what describes this host
    or an allocation the control plane itself may run in (SLURM_CONF still finds the cluster)."""
    env = trainer_environment(token)
    for name in list(env):
        if (name.startswith("SLURM_") and name != "SLURM_CONF") or name == "CUDA_VISIBLE_DEVICES":
            del env[name]
    return env


class SlurmExecutor:
    name = "slurm"
    pushes_jobs = True
    cluster_queue = True
    handle_noun = "Slurm job"

    def __init__(
        self,
        *,
        options: SlurmOptions,
        jobs_dir: Path,
        control_plane_url: str,
        token_for: Callable[[TrainerJob], str | None],
        poll_interval_s: float,
    ) -> None:
        self.options = options
        self.jobs_dir = jobs_dir
        self.control_plane_url = control_plane_url
        self.poll_interval_s = poll_interval_s
        self._token_for = token_for
        self._tracked: dict[str, Tracked] = {}  # job id -> its Slurm job
        self._cancelled: set[tuple[str, int, bool]] = set()  # (job, Slurm job, while pending)
        self._killed: set[str] = set()
        self._last_query = float("-inf")
        self._names: tuple[float, dict[str, int]] | None = None
        self._sacct_works = True

    def _files(self, job_id: str) -> JobFiles:
        return JobFiles.of(self.jobs_dir, job_id)

    def _track(self, job_id: str, slurm_id: int) -> None:
        self._tracked[job_id] = Tracked(slurm_id, SlurmOutput(self._files(job_id), slurm_id))
        self._last_query = float("-inf")  # ask Slurm about it at the next pass

    # ------------------------------------------------------------------ start
    def start(self, job: JobRecord) -> int:
        files = self._files(job.id)
        files.folder.mkdir(parents=True, exist_ok=True)
        files.exit_status.unlink(missing_ok=True)  # a previous attempt's
        gpus = job.gpus_requested  # per node here
        ranks = gpus or job.train_config().nproc
        write_trainer_config(job, files, nproc=ranks)
        script = files.folder / SCRIPT_NAME
        script.write_text(
            render(
                self.options,
                job_id=job.id,
                attempt=job.attempt,
                files=files,
                control_plane_url=self.control_plane_url,
                gpus_per_node=gpus,
                ranks_per_node=ranks,
            )
        )
        environment = submission_environment(self._token_for(job))
        submitted = run_slurm(["sbatch", "--parsable", str(script)], cwd=files.folder, env=environment)
        if submitted.returncode != 0:
            raise ExecutorError(f"sbatch refused it: {submitted.stderr.strip() or submitted.stdout.strip()}")
        try:
            slurm_id = int(submitted.stdout.strip().split(";")[0])  # `id` or `id;cluster`
        except ValueError:
            raise ExecutorError(f"sbatch answered {submitted.stdout.strip()!r}, not a job id") from None
        append_line(
            files.log,
            f"attempt {job.attempt}: submitted to Slurm as job {slurm_id} "
            f"({self.options.nodes} node(s) x {ranks} rank(s)): sbatch {script}",
        )
        self._track(job.id, slurm_id)
        return slurm_id

    # ------------------------------------------------------------------ stop
    def cancel(self, job: JobRecord) -> None:
        if job.pid is None:
            return
        pending = job.state == JobState.QUEUED
        key = (job.id, job.pid, pending)
        if key in self._cancelled:
            return
        self._cancelled.add(key)
        files = self._files(job.id)
        if pending:
            self._scancel(job.id, ["--state=PENDING", str(job.pid)])
            append_line(files.log, f"cancel: Slurm job {job.pid} taken out of the queue (scancel)")
        else:
            sent = files.folder / f"slurm-{job.pid}.term-sent"
            if sent.exists():  # sent before a restart: a second SIGTERM would skip the checkpoint
                return
            self._scancel(job.id, ["--signal=TERM", str(job.pid)])
            sent.touch()
            append_line(
                files.log,
                f"cancel: SIGTERM sent to every process of Slurm job {job.pid} (scancel --signal=TERM): "
                "the trainer checkpoints, then exits",
            )
        self._last_query = float("-inf")

    def kill(self, job: JobRecord) -> None:
        if job.pid is None:
            return
        self._killed.add(job.id)
        self._scancel(job.id, [str(job.pid)])
        files = self._files(job.id)
        if files.folder.is_dir():  # else a deleted job's submission, withdrawn
            append_line(files.log, f"cancel: grace period over: Slurm job {job.pid} cancelled")
        self._last_query = float("-inf")

    def _scancel(self, job_id: str, args: list[str]) -> None:
        try:
            done = run_slurm(["scancel", *args])
        except ExecutorError as exc:
            logger.warning("job %s: %s", job_id, exc)
            return
        if done.returncode != 0:  # e.g. it ended meanwhile: the next squeue says how
            logger.warning("job %s: scancel %s: %s", job_id, " ".join(args), done.stderr.strip())

    # ------------------------------------------------------------------ watch
    def poll(self) -> list[ProcessExit | JobProgress]:
        for tracked in self._tracked.values():
            tracked.output.copy()
        now = time.monotonic()
        if not self._tracked or now - self._last_query < self.poll_interval_s:
            return []
        self._last_query = now
        try:
            queue = self._squeue([t.slurm_id for t in self._tracked.values()])
        except ExecutorError as exc:
            logger.warning("cannot ask Slurm about the jobs (again in %.0f s): %s", self.poll_interval_s, exc)
            return []
        reports: list[ProcessExit | JobProgress] = []
        forgotten: dict[str, Tracked] = {}
        for job_id, tracked in list(self._tracked.items()):
            row = queue.get(tracked.slurm_id)
            if row is None:
                forgotten[job_id] = tracked
            elif row.state in ENDED:
                ending = self._scontrol_ending(tracked.slurm_id) or Ending(row.state, None)
                reports.append(self._ended(job_id, ending))
            else:
                running = row.state not in WAITING
                progress = JobProgress(job_id, running=running, reason=row.reason, nodes=row.nodes or None)
                if tracked.reported != (running, row.reason):
                    tracked.reported = (running, row.reason)
                    reports.append(progress)
        if forgotten:
            endings = self._sacct_endings([t.slurm_id for t in forgotten.values()])
            for job_id, tracked in forgotten.items():
                reports.append(self._ended(job_id, endings.get(tracked.slurm_id)))
        return reports

    def _ended(self, job_id: str, ending: Ending | None) -> ProcessExit:
        tracked = self._tracked.pop(job_id)
        tracked.output.copy(final=True)  # before the end is told: a failure's reason quotes the log
        self._cancelled = {key for key in self._cancelled if key[0] != job_id}
        killed = job_id in self._killed
        self._killed.discard(job_id)
        slurm_id = tracked.slurm_id
        if ending is None:  # squeue and sacct know nothing of it: the script's own record
            code = self._files(job_id).read_exit_status()
            if code is not None:
                return ProcessExit(job_id, code)
            return ProcessExit(
                job_id,
                None,
                JobState.FAILED,
                f"Slurm job {slurm_id} ended while nobody watched, and Slurm no longer knows how "
                "(squeue forgets ended jobs after MinJobAge; sacct needs accounting); its script left "
                "no exit status",
            )
        if ending.state in ("COMPLETED", "FAILED"):  # the script's status tells (service.py's rules)
            return ProcessExit(job_id, ending.exit_code)
        if ending.state == "CANCELLED":
            if killed:  # our scancel after the grace period: SIGTERM, then SIGKILL after KillWait
                return ProcessExit(job_id, 128 + signal.SIGKILL)
            return ProcessExit(
                job_id,
                ending.exit_code,
                JobState.CANCELLED,
                f"Slurm job {slurm_id} was cancelled in Slurm (scancel), not through the control plane",
            )
        why = ENDED.get(ending.state) or "Slurm ended it"
        return ProcessExit(
            job_id,
            ending.exit_code,
            JobState.FAILED,
            f"Slurm job {slurm_id} ended {ending.state}: {why}; resume continues from its last checkpoint",
        )

    def _squeue(self, ids: list[int]) -> dict[int, QueueRow]:
        """What squeue says of `ids` (those it no longer knows are left out); one call for all."""
        jobs = ",".join(map(str, ids))
        # The reason last: its text may hold anything.
        answer = run_slurm(["squeue", "--noheader", "--states=all", f"--jobs={jobs}", "--format=%i|%T|%N|%r"])
        if answer.returncode != 0:
            if "Invalid job id" in answer.stderr:  # every one of them forgotten
                return {}
            raise ExecutorError(f"squeue: {answer.stderr.strip()}")
        rows = {}
        for line in answer.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) == 4 and parts[0].isdigit():
                reason = parts[3].strip()
                rows[int(parts[0])] = QueueRow(
                    state=parts[1], nodes=parts[2], reason=None if reason in ("", "None") else reason
                )
        return rows

    def _scontrol_ending(self, slurm_id: int) -> Ending | None:
        """The end state and exit status of an ended job slurmctld still holds."""
        try:
            answer = run_slurm(["scontrol", "--oneliner", "show", "job", str(slurm_id)])
        except ExecutorError:
            return None
        state = re.search(r"\bJobState=(\S+)", answer.stdout)
        code = re.search(r"\bExitCode=(\S+)", answer.stdout)
        if answer.returncode != 0 or state is None:
            return None
        return Ending(state.group(1), exit_status(code.group(1)) if code else None)

    def _sacct_endings(self, ids: list[int]) -> dict[int, Ending]:
        """How jobs squeue forgot ended, from Slurm's accounting (one call); {} without it."""
        if not self._sacct_works:
            return {}
        try:
            jobs = ",".join(map(str, ids))
            answer = run_slurm(
                [
                    "sacct",
                    "--noheader",
                    "--parsable2",
                    "--allocations",
                    f"--jobs={jobs}",
                    "--format=JobIDRaw,State,ExitCode",
                ]
            )
        except ExecutorError as exc:
            logger.warning("sacct: %s", exc)
            return {}
        if answer.returncode != 0 or "accounting storage is disabled" in answer.stdout + answer.stderr:
            self._sacct_works = False  # asked once: it will not start working while we run
            logger.info("no sacct (no Slurm accounting): a job squeue forgot ends by its exit_status file")
            return {}
        endings = {}
        for line in answer.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[0].isdigit() and parts[1]:
                # `CANCELLED by 1000`: the first word is the state
                endings[int(parts[0])] = Ending(parts[1].split()[0], exit_status(parts[2]))
        return endings

    # ------------------------------------------------------------------ restart
    def attach(self, job: JobRecord) -> int | None:
        if job.id in self._tracked:
            return self._tracked[job.id].slurm_id
        slurm_id = job.pid if job.pid is not None else self._submitted_as(job_name(job.id, job.attempt))
        if slurm_id is not None:
            self._track(job.id, slurm_id)
        return slurm_id

    def _submitted_as(self, name: str) -> int | None:
        """The id of our Slurm job called `name` (squeue's memory: pending, running, recently ended)."""
        now = time.monotonic()
        if self._names is None or now - self._names[0] > NAME_CACHE_S:
            names: dict[str, int] = {}
            try:
                answer = run_slurm(
                    ["squeue", "--noheader", "--states=all", f"--user={os.getuid()}", "--format=%i|%j"]
                )
                for line in answer.stdout.splitlines():
                    slurm_id, _, found = line.partition("|")
                    if found.startswith("dflash-") and slurm_id.isdigit():
                        names[found] = int(slurm_id)
            except ExecutorError as exc:
                logger.warning("cannot list our Slurm jobs: %s", exc)
            self._names = (now, names)
        return self._names[1].get(name)
