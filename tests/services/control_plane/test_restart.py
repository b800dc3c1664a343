"""A control-plane restart loses no job: `dflash control-plane` is killed (SIGKILL) mid-job and
started again on the same database.

- The trainer lived on: the new control plane re-attaches to it (found by its job id when its
  pid never reached the store), the run finishes, the trainer's buffered metric rows arrive
  after the restart, and the job ends `succeeded`.
- The trainer died with the host's processes: the job is marked failed with the reason.
Either way the job that was queued behind it still starts.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import (
    ControlPlaneProcess,
    free_port,
    kill_groups,
    trainer_of,
    wait_for,
)


@pytest.fixture
def control_plane(tmp_path, workspace):
    """start() → a `dflash control-plane` process on the same port and database every time."""
    port = free_port()
    args = [
        "--db", str(tmp_path / "jobs.db"), "--data-root", str(workspace["root"]),
        "--checkpoint-root", str(tmp_path / "checkpoints"), "--gpus", "", "--max-concurrent-jobs", "1",
        "--poll-interval-s", "0.2",
    ]  # fmt: skip
    started: list[ControlPlaneProcess] = []
    pids: set[int] = set()

    def start() -> ControlPlaneProcess:
        process = ControlPlaneProcess(args, port=port)
        started.append(process)
        return process

    start.pids = pids  # type: ignore[attr-defined]
    yield start
    for process in started:
        if process.process.poll() is None:
            pids.update(process.active_pids())
            process.kill()
    kill_groups(sorted(pids))


def submit_two(cp: ControlPlaneProcess, workspace: dict[str, Path]) -> tuple[str, str]:
    first = cp.submit(tiny_job(workspace, epochs=2, name="first"))["id"]
    second = cp.submit(tiny_job(workspace, epochs=1, name="queued behind"))["id"]
    return first, second


@pytest.mark.parametrize("pid_stored", [True, False], ids=["pid stored", "pid never stored"])
def test_restart_reattaches_a_live_trainer(control_plane, workspace, tmp_path, pid_stored):
    cp = control_plane()
    first, second = submit_two(cp, workspace)
    launcher = cp.wait_pid(first)
    control_plane.pids.add(launcher)
    cp.wait_state(first, "running")
    trainer = trainer_of(launcher)
    os.kill(trainer, signal.SIGSTOP)  # mid-run while the control plane goes away
    rows_before = len(cp.metric_rows(first))
    assert cp.job(second)["state"] == "queued"
    cp.kill()
    if not pid_stored:
        # It died after starting the trainer and before storing its pid: the next one must find
        # the trainer by its job id, or a resume would start a second one on the same checkpoints.
        with sqlite3.connect(tmp_path / "jobs.db") as db:
            db.execute("UPDATE jobs SET pid = NULL WHERE id = ?", (first,))

    os.kill(trainer, signal.SIGCONT)  # it trains on with nobody listening (its sink retries)
    cp = control_plane()
    job = cp.job(first)
    assert job["state"] == "running" and job["pid"] == launcher
    assert f"re-attached to process {launcher}" in cp.client.get(f"/v1/jobs/{first}/logs").text
    done = cp.wait_state(first, "succeeded")
    assert done["exit_code"] == 0  # read from the launcher's exit file: we are not its parent
    rows = cp.metric_rows(first)
    assert len(rows) > rows_before and done["step"] == rows[-1]["step"]
    assert cp.client.get(f"/v1/jobs/{first}/checkpoints").json()["latest"] == "1"
    assert cp.wait_state(second, "succeeded")["exit_code"] == 0


def test_restart_after_the_trainer_died_fails_the_job_and_starts_the_queue(control_plane, workspace):
    cp = control_plane()
    first, second = submit_two(cp, workspace)
    launcher = cp.wait_pid(first)
    cp.wait_state(first, "running")
    cp.kill()
    os.killpg(launcher, signal.SIGKILL)  # the trainer goes too, without a word
    wait_for(lambda: not Path(f"/proc/{launcher}").exists() or _zombie(launcher), what="the trainer to die")

    cp = control_plane()
    failed = cp.job(first)
    assert failed["state"] == "failed"
    assert failed["reason"] == f"control plane restarted; trainer process {launcher} not found"
    assert failed["reason"] in cp.client.get(f"/v1/jobs/{first}/logs").text
    assert cp.wait_state(second, "succeeded")["exit_code"] == 0  # the queue moves on
    # And the failed job resumes from what it had checkpointed (or from scratch): it completes.
    assert cp.client.post(f"/v1/jobs/{first}/resume").json()["attempt"] == 2
    assert cp.wait_state(first, "succeeded")["attempt"] == 2


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
