"""The trainer agent's loop: one thread, one pass every heartbeat interval.

Each pass:
1. exits: trainers that ended are noted (their last log lines shipped first, so a failed job's
   reason quotes them);
2. logs: new output of every trainer is appended to its job's log on the control plane;
3. heartbeat: what runs (job → pid) and what ended; the answer says which jobs to stop
   (cancel: SIGTERM once, the trainer checkpoints; kill: SIGKILL to its process group);
4. claims: while it has room, the agent claims a queued job and starts its trainer, exactly as
   the control plane's local executor would (the same code: executors/local.py).

Being serial matters: every heartbeat after a claim reports the claimed job, which is how the
control plane tells a job the agent lost from one it is still starting.

What survives what:
- the control plane down: trainers keep training (their metric posts buffer), exits wait in
  memory and in the state file, and everything is reported once it answers again;
- the agent restarted: trainers run in their own sessions and outlive it; the state file
  (<work-dir>/agent_state.json) lists them, and the new agent re-adopts the live ones and reports
  how the others ended (the launcher wrote their exit status);
- SIGTERM (docker stop): every trainer gets SIGTERM and writes a checkpoint, the agent reports
  their exits and says goodbye; a second SIGTERM (or --stop-grace-s passing) kills them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from enum import Enum
from types import FrameType
from typing import TypeVar

from services.agent.client import ControlPlaneClient, Refused, Unreachable
from services.agent.settings import AgentSettings
from services.control_plane.executors.base import ExecutorError
from services.control_plane.executors.launcher import write_atomically
from services.control_plane.executors.local import LocalExecutor
from services.control_plane.job_logs import JobFiles
from services.control_plane.schemas import AgentExit, AgentHeartbeat, AgentJob, AgentRegister

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Failed(Enum):
    """A control-plane call that did not succeed (see TrainerAgent._call)."""

    UNREACHED = "unreached"
    REFUSED = "refused"


UNREACHED, REFUSED = Failed.UNREACHED, Failed.REFUSED
LOG_CHUNK_BYTES = 256 * 1024  # well under the control plane's 1 MiB body limit
DEFAULT_INTERVAL_S = 5.0


class AgentError(RuntimeError):
    """The agent cannot go on (the control plane refuses it: a wrong token, a bad registration)."""


class TrainerAgent:
    def __init__(self, settings: AgentSettings, *, token: str | None) -> None:
        self.settings = settings
        self.gpus = settings.gpu_list()
        self.client = ControlPlaneClient(settings.control_plane, token=token)
        self.jobs_dir = settings.work_dir.resolve() / "jobs"
        self.state_file = settings.work_dir.resolve() / "agent_state.json"
        self.executor = LocalExecutor(
            jobs_dir=self.jobs_dir,
            python=settings.python,
            control_plane_url=settings.control_plane,
            # The claim's own trainer token; the agent's token only for a control plane that
            # mints none (older versions): a trainer should never hold more than its job needs.
            token_for=lambda job: getattr(job, "trainer_token", None) or token,
        )
        self.jobs: dict[str, AgentJob] = {}  # the trainers this agent runs
        self.log_offsets: dict[str, int] = {}  # bytes of each job's log already shipped
        self.exits: list[AgentExit] = []  # ended, not yet acknowledged by the control plane
        self.log_backlog: set[str] = set()  # ended jobs whose last log lines are not shipped yet
        self.interval_s = settings.heartbeat_interval_s or DEFAULT_INTERVAL_S
        self.reachable = True
        self._stop = threading.Event()
        self._signals = 0

    @property
    def agent_id(self) -> str:
        return self.settings.name

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._adopt()
        self._register()
        while not self._stop.is_set():
            self.run_pass()
            self._stop.wait(self.interval_s)
        self._shut_down()
        return 0

    def run_pass(self) -> None:
        self._collect_exits()
        self._ship_logs()
        if self._heartbeat() and not self._stop.is_set():
            self._claim_while_room()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info("%s: stopping; the trainers write a checkpoint first", signal.Signals(signum).name)
            self._stop.set()
        else:
            logger.warning("second stop signal: killing the trainers now (no checkpoint)")
            for job in list(self.jobs.values()):
                self.executor.kill(job)

    # ------------------------------------------------------------------ control plane calls
    def _register(self) -> None:
        body = AgentRegister(
            name=self.agent_id, host=socket.gethostname(), gpus=self.gpus, max_jobs=self.settings.max_jobs
        )
        waited = False
        while not self._stop.is_set():
            try:
                answer = self.client.register(body)
            except Unreachable as exc:
                if not waited:
                    logger.warning("control plane not reachable yet (%s); retrying", exc)
                    waited = True
                self._stop.wait(min(self.interval_s, 2.0))
                continue
            except Refused as exc:
                raise AgentError(f"the control plane refused the registration: {exc}") from None
            if self.settings.heartbeat_interval_s is None:
                self.interval_s = answer.heartbeat_interval_s
            logger.info(
                "registered with %s as agent %s: GPUs %s, up to %d job(s), heartbeat every %.1f s",
                self.settings.control_plane,
                answer.id,
                self.gpus or "none",
                self.settings.max_jobs,
                self.interval_s,
            )
            return

    def _call(self, what: str, function: Callable[..., T], *args: object) -> T | Failed:
        """Run a control-plane call. UNREACHED when it got no answer (logged once per outage),
        REFUSED when the control plane said no (logged); a 404 for this agent re-registers, a
        401/403 ends the agent (a token that is wrong stays wrong)."""
        try:
            result = function(*args)
        except Unreachable as exc:
            if self.reachable:
                logger.warning("control plane unreachable (%s: %s); trainers keep running", what, exc)
                self.reachable = False
            return UNREACHED
        except Refused as exc:
            if exc.status in (401, 403):
                raise AgentError(f"the control plane refused {what}: {exc} (check the token)") from None
            if exc.status == 404 and "register first" in str(exc):
                logger.warning("the control plane does not know this agent (%s); registering again", exc)
                self._register()
                return UNREACHED
            logger.warning("the control plane refused %s: %s", what, exc)
            return REFUSED
        if not self.reachable:
            logger.info("control plane reachable again")
            self.reachable = True
        return result

    def _heartbeat(self) -> bool:
        body = AgentHeartbeat(
            running={job_id: job.pid for job_id, job in self.jobs.items() if job.pid is not None},
            exits=list(self.exits),
        )
        orders = self._call("the heartbeat", self.client.heartbeat, self.agent_id, body)
        if isinstance(orders, Failed):
            return False
        if body.exits:  # acknowledged: forget them (and on disk, for a restart)
            reported = {ended.job_id for ended in body.exits}
            self.exits = [ended for ended in self.exits if ended.job_id not in reported]
            self._save_state()
        for job_id in orders.cancel:
            if job_id in self.jobs:
                self.executor.cancel(self.jobs[job_id])
        for job_id in orders.kill:
            if job_id in self.jobs:
                logger.warning("job %s: the control plane says stop now; SIGKILL", job_id)
                self.executor.kill(self.jobs[job_id])
        return True

    def _claim_while_room(self) -> None:
        while len(self.jobs) < self.settings.max_jobs and not self._stop.is_set():
            job = self._call("a claim", self.client.claim, self.agent_id)
            if not isinstance(job, AgentJob):
                return  # nothing to run (204), or the call failed
            self._start(job)

    def _start(self, job: AgentJob) -> None:
        try:
            job.pid = self.executor.start(job)
        except (ExecutorError, OSError, ValueError) as exc:
            logger.error("job %s: could not start its trainer: %s", job.id, exc)
            self.exits.append(
                AgentExit(job_id=job.id, exit_code=None, note=f"the agent could not start it: {exc}")
            )
        else:
            logger.info(
                "job %s (attempt %d): trainer pid %d on GPUs %s", job.id, job.attempt, job.pid, job.gpus
            )
            self.jobs[job.id] = job
            self.log_offsets.setdefault(job.id, 0)
        self._save_state()

    # ------------------------------------------------------------------ trainers
    def _collect_exits(self) -> None:
        for ended in self.executor.poll():
            if ended.job_id not in self.jobs:
                continue
            self._ship_log(ended.job_id)
            del self.jobs[ended.job_id]
            note = (
                "the trainer agent was stopping; resume the job to continue" if self._stop.is_set() else None
            )
            self.exits.append(AgentExit(job_id=ended.job_id, exit_code=ended.exit_code, note=note))
            logger.info("job %s: trainer exited with status %s", ended.job_id, ended.exit_code)
            self._save_state()

    def _ship_logs(self) -> None:
        for job_id in [*self.jobs, *self.log_backlog]:
            if not self._ship_log(job_id):
                return  # unreachable: the rest waits for the next pass

    def _ship_log(self, job_id: str) -> bool:
        """Send the job's new log bytes; False when the control plane could not be reached."""
        path = JobFiles.of(self.jobs_dir, job_id).log
        offset = shipped = self.log_offsets.get(job_id, 0)
        reached = True
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as log:
            log.seek(offset)
            while chunk := log.read(LOG_CHUNK_BYTES):
                sent = self._call("a log upload", self.client.append_log, self.agent_id, job_id, chunk)
                if sent is UNREACHED:
                    reached = False
                    break
                shipped += len(chunk)  # taken, or refused for good (a deleted job): not resent
        if reached:
            self.log_backlog.discard(job_id)
        if shipped != offset:
            self.log_offsets[job_id] = shipped
            self._save_state()
        return reached

    # ------------------------------------------------------------------ restarts
    def _save_state(self) -> None:
        state = {
            # No trainer token on disk: the trainer has it, and a restarted agent never needs it.
            "jobs": {
                job_id: job.model_dump(exclude={"config", "trainer_token"})
                for job_id, job in self.jobs.items()
            },
            "log_offsets": {
                k: v for k, v in self.log_offsets.items() if k in self.jobs or k in self.log_backlog
            },
            "log_backlog": sorted(self.log_backlog),
            "exits": [ended.model_dump() for ended in self.exits],
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_file, json.dumps(state, indent=1))

    def _adopt(self) -> None:
        """Take over what a previous run of this agent left: live trainers, unreported exits."""
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s (%s)", self.state_file, exc)
            return
        self.exits = [AgentExit.model_validate(ended) for ended in state.get("exits", [])]
        self.log_offsets = {k: int(v) for k, v in state.get("log_offsets", {}).items()}
        self.log_backlog = set(state.get("log_backlog", []))
        for job_id, fields in state.get("jobs", {}).items():
            job = AgentJob.model_validate({**fields, "config": {}})
            pid = self.executor.attach(job)
            if pid is not None:
                self.jobs[job_id] = job.model_copy(update={"pid": pid})
                logger.info("job %s: re-adopted its trainer (pid %s)", job_id, pid)
                continue
            self.log_backlog.add(job_id)  # its last lines go out with the first pass
            code = JobFiles.of(self.jobs_dir, job_id).read_exit_status()
            note = "its trainer ended while the agent was away"
            self.exits.append(AgentExit(job_id=job_id, exit_code=code, note=note))
        self._save_state()

    # ------------------------------------------------------------------ stopping
    def _shut_down(self) -> None:
        deadline = time.monotonic() + self.settings.stop_grace_s
        if self.jobs:
            logger.info("asking %d trainer(s) to checkpoint and stop", len(self.jobs))
        for job in list(self.jobs.values()):
            self.executor.cancel(job)
        killed = False
        while self.jobs:
            if time.monotonic() > deadline and not killed:
                logger.warning("trainers did not stop within %.0f s: SIGKILL", self.settings.stop_grace_s)
                for job in list(self.jobs.values()):
                    self.executor.kill(job)
                killed = True
            time.sleep(0.2)
            self._collect_exits()
        self._ship_logs()
        if self.exits or self.log_backlog:
            self._heartbeat()
        if not self.exits:  # everything reported: the control plane may forget us cleanly
            with contextlib.suppress(Unreachable, Refused):
                self.client.goodbye(self.agent_id)
        logger.info("trainer agent %s stopped", self.agent_id)
