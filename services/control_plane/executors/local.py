"""The `local` executor: each job's trainer is a process on this host, started by the control plane.

    launcher --exit-file <jobs-dir>/<id>/exit_status --
        python -m services.cli.main train --config <jobs-dir>/<id>/trainer.yaml
            --control-plane-url <our url> --job-id <id> [--nproc N]

- GPUs: CUDA_VISIBLE_DEVICES is the job's assigned GPUs (empty for a CPU job, so it can never
  touch a GPU another job holds); `--nproc N` for N > 1 runs torchrun with one rank per GPU.
- The trainer's token (its job attempt's own, credentials.py) travels in
  $DFLASH_CONTROL_PLANE_TOKEN, never on the command line (`ps` shows that) nor in the log.
- Output goes straight into the job's log file (see job_logs.py for why not a pipe).
- Each job runs in its own session and process group (the launcher leads it): the control plane
  stopping or restarting leaves trainers running, and a hard kill reaches torchrun's ranks too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from services.control_plane.executors.base import ExecutorError, ProcessExit, TrainerJob
from services.control_plane.executors.launcher import exit_status
from services.control_plane.executors.trainer_setup import trainer_environment, write_trainer_config
from services.control_plane.job_logs import JobFiles, append_line
from services.trainer.metric_sinks.control_plane import TOKEN_ENV

logger = logging.getLogger(__name__)

LAUNCHER_MODULE = "services.control_plane.executors.launcher"
# The checkout (or site-packages) this control plane runs from: its trainers run the same code.
CODE_ROOT = Path(__file__).resolve().parents[3]


def process_cmdline(pid: int) -> list[str] | None:
    """The argv of a live, non-zombie process; None when there is none (or it cannot be read)."""
    proc = Path(f"/proc/{pid}")
    try:
        stat = (proc / "stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # exited, waiting to be reaped
            return None
        return [part for part in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0") if part]
    except (OSError, IndexError):
        pass
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True)
    except OSError:
        return None
    line = out.stdout.strip()
    if out.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split()[1:]


def is_our_trainer(pid: int, job_id: str) -> bool:
    """pid is alive and is the launcher of this job's trainer (not a reused pid)."""
    argv = process_cmdline(pid)
    if not argv or LAUNCHER_MODULE not in argv:
        return False
    return any(a == "--job-id" and b == job_id for a, b in itertools.pairwise(argv))


def find_trainer(job_id: str) -> int | None:
    """The pid of this job's live launcher, looked for among all processes (Linux `/proc`)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    pids = sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())
    return next((pid for pid in pids if is_our_trainer(pid, job_id)), None)


class LocalExecutor:
    name = "local"
    pushes_jobs = True
    cluster_queue = False
    handle_noun = "process"

    def __init__(
        self,
        *,
        jobs_dir: Path,
        python: str,
        control_plane_url: str,
        token_for: Callable[[TrainerJob], str | None],
    ) -> None:
        """`token_for(job)`: the bearer token the job's trainer posts its metrics with (None:
        the control plane has none)."""
        self.jobs_dir = jobs_dir
        self.python = python
        self.control_plane_url = control_plane_url
        self._token_for = token_for
        self._children: dict[str, subprocess.Popen] = {}  # started by this process
        self._adopted: dict[str, int] = {}  # alive when we started: job id -> pid
        self._cancelled: set[str] = set()

    # ------------------------------------------------------------------ start
    def command(self, job: TrainerJob, files: JobFiles) -> list[str]:
        train = [
            self.python, "-m", "services.cli.main", "train", "--config", str(files.trainer_config),
            "--control-plane-url", self.control_plane_url, "--job-id", job.id,
        ]  # fmt: skip
        if len(job.gpus) > 1:
            train += ["--nproc", str(len(job.gpus))]
        return [self.python, "-m", LAUNCHER_MODULE, "--exit-file", str(files.exit_status), "--", *train]

    def environment(self, job: TrainerJob) -> dict[str, str]:
        env = trainer_environment(self._token_for(job))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in job.gpus)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"  # lines reach the log (and `logs?follow`) as they are written
        env["TQDM_MININTERVAL"] = "10"  # a log file is not a terminal: a bar update every 10 s is plenty
        return env

    def start(self, job: TrainerJob) -> int:
        files = JobFiles.of(self.jobs_dir, job.id)
        files.folder.mkdir(parents=True, exist_ok=True)
        files.exit_status.unlink(missing_ok=True)  # a previous attempt's
        write_trainer_config(job, files, nproc=len(job.gpus) or None)  # one rank per assigned GPU
        command = self.command(job, files)
        environment = self.environment(job)
        append_line(
            files.log,
            f"attempt {job.attempt}: starting on GPUs [{','.join(map(str, job.gpus))}]: "
            f"{' '.join(command[command.index('--') + 1 :])}"
            + (f" (token in ${TOKEN_ENV})" if TOKEN_ENV in environment else ""),
        )
        try:
            with open(files.log, "ab") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=files.folder,
                    env=environment,
                    start_new_session=True,
                )
        except OSError as exc:
            raise ExecutorError(f"could not start the trainer: {exc}") from exc
        self._children[job.id] = process
        return process.pid

    # ------------------------------------------------------------------ stop
    def cancel(self, job: TrainerJob) -> None:
        if job.pid is None or job.id in self._cancelled or not self._is_tracked(job):
            return
        self._cancelled.add(job.id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(job.pid, signal.SIGTERM)
        append_line(
            JobFiles.of(self.jobs_dir, job.id).log,
            "cancel: SIGTERM sent (the trainer checkpoints, then exits)",
        )

    def kill(self, job: TrainerJob) -> None:
        if job.pid is None or not self._is_tracked(job):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signal.SIGKILL)  # the launcher leads the group: torchrun and ranks too
        append_line(JobFiles.of(self.jobs_dir, job.id).log, "cancel: grace period over, SIGKILL sent")

    def _is_tracked(self, job: TrainerJob) -> bool:
        """Only signal a pid we started or verified: never a stranger that reused the number."""
        child = self._children.get(job.id)
        if child is not None:
            return child.poll() is None
        return job.id in self._adopted and is_our_trainer(job.pid or -1, job.id)

    # ------------------------------------------------------------------ watch
    def poll(self) -> list[ProcessExit]:
        exits = []
        for job_id, process in list(self._children.items()):
            returncode = process.poll()
            if returncode is not None:
                del self._children[job_id]
                self._cancelled.discard(job_id)
                exits.append(ProcessExit(job_id, exit_status(returncode)))
        for job_id, pid in list(self._adopted.items()):
            if not is_our_trainer(pid, job_id):
                del self._adopted[job_id]
                self._cancelled.discard(job_id)
                # Not our child: the launcher's file is the only record of how it ended.
                exits.append(ProcessExit(job_id, JobFiles.of(self.jobs_dir, job_id).read_exit_status()))
        return exits

    def attach(self, job: TrainerJob) -> int | None:
        if job.id in self._children:
            return self._children[job.id].pid
        if job.pid is None:
            pid = find_trainer(job.id)
        else:
            pid = job.pid if is_our_trainer(job.pid, job.id) else None
        if pid is not None:
            self._adopted[job.id] = pid
        return pid
