"""The slurm executor against a real Slurm cluster on this host (tests/factories/slurm_cluster.py):
jobs submitted over REST run `dflash train` through sbatch, srun and torchrun (gloo, CPU).

- a job trains to success with its checkpoints, and a control plane killed mid-job re-attaches;
- two slurmd on this host make two nodes: one job trains across both (one c10d rendezvous);
- cancel: the trainer checkpoints on the SIGTERM every process of the step gets, then the job is
  cancelled; a Slurm requeue (what preemption does with --requeue) resumes from the checkpoint;
- the time limit: the job fails with TIMEOUT in its reason, after the trainer checkpointed;
- a waiting job shows Slurm's reason (a begin time, drained nodes), cancel takes it out of the
  queue (a scancel from outside cancels it too), and a restarted control plane finds a
  submission it never stored by its job name.

Each test has its own control plane (in this process, or a real `dflash control-plane` where it
is killed), all share one cluster; a test's Slurm jobs are cancelled when it ends.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories.slurm_cluster import NODES, SlurmCluster, slurm_unavailable
from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import (
    TOKEN,
    ControlPlaneProcess,
    ControlPlaneServer,
    free_port,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.slurm

ALL_NODES = f"n[1-{len(NODES)}]"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    # Not under pytest's tmp folders: munged wants every folder above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="dflash-slurm-"))
    cluster = SlurmCluster.start(root)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in cluster.env.items():  # SLURM_CONF: the control planes' sbatch and squeue
                patch.setenv(name, value)
            yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    yield cluster
    cluster.cancel_all()  # nothing of one test runs into the next
    cluster.run("scontrol", "update", f"nodename={ALL_NODES}", "state=resume")  # if it drained them


@pytest.fixture
def start_cp(tmp_path: Path, workspace: dict[str, Path]) -> Iterator[Callable[..., ControlPlaneServer]]:
    """start(**settings) → a control plane with the slurm executor, on this test's store (the
    same one every time: a second start is a restart)."""
    servers: list[ControlPlaneServer] = []

    def start(**overrides: Any) -> ControlPlaneServer:
        values = {
            "executor": "slurm",
            "data_root": workspace["root"],
            "slurm_poll_interval_s": 0.5,
            "max_concurrent_jobs": 2,
            "token": TOKEN,
            **overrides,
        }
        server = ControlPlaneServer(settings_for(tmp_path, **values), token=TOKEN)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if not server.client.is_closed:
            server.stop()


def log_of(api: Any, job_id: str) -> str:
    return api.client.get(f"/v1/jobs/{job_id}/logs", params={"lines": 10_000}).text


def checkpoints(api: Any, job_id: str) -> dict[str, Any]:
    return api.client.get(f"/v1/jobs/{job_id}/checkpoints").json()


def test_a_job_trains_through_sbatch_srun_and_torchrun_and_a_restart_reattaches(slurm, workspace, tmp_path):
    port = free_port()
    args = [
        "--db", str(tmp_path / "jobs.db"), "--data-root", str(workspace["root"]),
        "--checkpoint-root", str(tmp_path / "checkpoints"), "--executor", "slurm",
        "--slurm-partition", "debug", "--slurm-time-limit", "30", "--slurm-poll-interval-s", "0.5",
        "--poll-interval-s", "0.2",
    ]  # fmt: skip
    env = {"DFLASH_CONTROL_PLANE_TOKEN": TOKEN}
    first = ControlPlaneProcess(args, port=port, env=env)
    try:
        jid = first.submit(tiny_job(workspace, epochs=2))["id"]
        slurm_id = first.wait_state(jid, "running")["pid"]
        # Its trainer reached the control plane with the token sbatch carried to it.
        wait_for(lambda: first.metric_rows(jid), what="the trainer's first metric row")
    finally:
        first.kill()  # SIGKILL: no shutdown code runs; the Slurm job goes on
    script = (tmp_path / "jobs.db.jobs" / jid / "job.sbatch").read_text()
    for line in (f"#SBATCH --job-name=dflash-{jid}.1", "#SBATCH --partition=debug", "#SBATCH --time=30"):
        assert line in script.splitlines()
    assert "dflash-trainer:" not in script and TOKEN not in script  # the token is in sbatch's environment

    second = ControlPlaneProcess(args, port=port, env=env)
    try:
        done = second.wait_state(jid, "succeeded")
        log, rows, listing = log_of(second, jid), second.metric_rows(jid), checkpoints(second, jid)
    finally:
        second.kill()
    assert done["pid"] == slurm_id and done["exit_code"] == 0 and done["reason"] is None
    assert slurm.job(slurm_id)["JobState"] == "COMPLETED"
    assert f"control plane restarted: re-attached to Slurm job {slurm_id}" in log
    # Slurm's output file is the job's log: each line once, the second control plane reading on
    # where the first stopped.
    assert log.count(f"slurm job {slurm_id} (restart 0) on n1") == 1
    assert log.count("trained ") == 1 and "rendezvous" in log
    save = Path(done["config"]["save_path"])
    on_disk = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert rows and {row["step"] for row in rows} <= set(on_disk) and rows[0]["step"] == 0
    assert listing["latest"] == "1" and [c["name"] for c in listing["data"]] == ["0", "1"]


def test_a_job_trains_across_two_nodes(slurm, workspace, start_cp):
    if slurm.nodes_up < 2:
        pytest.skip(
            "this Slurm build runs one slurmd per host (no --enable-multiple-slurmd); two nodes are "
            "covered by tests/services/trainer/test_distributed.py (torchrun --nnodes 2, c10d)"
        )
    server = start_cp(slurm_nodes=2)
    jid = server.submit(tiny_job(workspace, epochs=1))["id"]
    done = server.wait_state(jid, "succeeded")
    log = log_of(server, jid)
    assert slurm.job(done["pid"])["NodeList"] == ALL_NODES
    assert f"Slurm job {done['pid']} runs on {ALL_NODES}" in log
    assert "torchrun on 2 node(s) x 1 rank(s)" in log
    assert "2 ranks (FSDP2), cpu" in log  # one world over both nodes' torchruns
    assert checkpoints(server, jid)["latest"] == "0"


def test_cancel_checkpoints_then_cancels_and_a_requeue_resumes_from_the_checkpoint(
    slurm, workspace, start_cp
):
    server = start_cp()
    cancelled_id = server.submit(tiny_job(workspace, epochs=50, name="cancelled"))["id"]
    requeued_id = server.submit(tiny_job(workspace, epochs=3, checkpoint_freq=5, name="requeued"))["id"]

    server.wait_state(cancelled_id, "running")
    seen = wait_for(lambda: server.job(cancelled_id)["step"], what="a training step")
    assert server.client.post(f"/v1/jobs/{cancelled_id}/cancel").json()["cancel_requested"]
    cancelled = server.wait_state(cancelled_id, "cancelled")
    log = log_of(server, cancelled_id)
    assert f"SIGTERM sent to every process of Slurm job {cancelled['pid']}" in log
    # torchrun passed its copy of the SIGTERM on to the ranks, which took it as the same request.
    assert "stopped by SIGTERM" in log
    listing = checkpoints(server, cancelled_id)
    latest = next(c for c in listing["data"] if c["name"] == listing["latest"])
    assert latest["kind"] == "step" and latest["step"] >= seen
    assert slurm.job(cancelled["pid"])["JobState"] != "CANCELLED"  # it stopped itself, in time

    slurm_id = server.wait_state(requeued_id, "running")["pid"]
    wait_for(lambda: server.job(requeued_id)["step"], what="a training step")
    slurm.scontrol("requeue", str(slurm_id))  # what a preemption does to a job submitted with --requeue
    waiting = server.wait_state(requeued_id, "queued")
    assert waiting["reason"].startswith(f"requeued as Slurm job {slurm_id}")
    # Slurm holds a requeued job back for two minutes, from when its processes are gone.
    wait_for(lambda: slurm.squeue()[slurm_id] == "PENDING", what="the requeue to complete")
    slurm.scontrol("update", f"jobid={slurm_id}", "StartTime=now")
    done = server.wait_state(requeued_id, "succeeded")
    log = log_of(server, requeued_id)
    assert done["pid"] == slurm_id and done["attempt"] == 1
    stopped = int(log.split("stopped by SIGTERM after ")[1].split()[0])
    assert f"slurm job {slurm_id} (restart 1)" in log
    assert f"resumed from {done['config']['save_path']}/step-{stopped:08d}" in log
    assert checkpoints(server, requeued_id)["latest"] == "2"


def test_a_job_past_its_time_limit_fails_with_timeout(slurm, workspace, start_cp):
    server = start_cp(slurm_time_limit="1")  # one minute, Slurm's smallest
    jid = server.submit(tiny_job(workspace, epochs=10_000))["id"]
    failed = server.wait_state(jid, "failed", timeout_s=300)  # Slurm looks at time limits every 30 s
    assert failed["reason"].startswith(f"Slurm job {failed['pid']} ended TIMEOUT: it ran past its time limit")
    assert slurm.job(failed["pid"])["JobState"] == "TIMEOUT"
    assert "stopped by SIGTERM" in log_of(server, jid)  # the trainer checkpointed at the limit


def test_a_waiting_job_shows_slurms_reason_and_cancel_takes_it_out_of_the_queue(slurm, workspace, start_cp):
    server = start_cp(slurm_sbatch_args="--begin=now+3600")
    jid = server.submit(tiny_job(workspace))["id"]
    waiting = wait_for(
        lambda: (job := server.job(jid))["reason"] and "BeginTime" in job["reason"] and job,
        what="Slurm's reason for holding the job",
    )
    slurm_id = waiting["pid"]
    assert (
        waiting["state"] == "queued"
        and waiting["reason"] == f"waiting in the queue as Slurm job {slurm_id}: BeginTime"
    )
    assert slurm.squeue()[slurm_id] == "PENDING"
    refused = server.client.delete(f"/v1/jobs/{jid}")
    assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]

    server.client.post(f"/v1/jobs/{jid}/cancel")
    cancelled = server.wait_state(jid, "cancelled")
    assert cancelled["reason"] == "cancelled before it started" and cancelled["exit_code"] is None
    assert slurm.squeue()[slurm_id] == "CANCELLED"
    assert server.client.delete(f"/v1/jobs/{jid}").status_code == 204

    # A scancel from outside (its user's, an admin's) ends the job too, and says so.
    other = server.submit(tiny_job(workspace))["id"]
    other_id = wait_for(lambda: server.job(other)["pid"], what="the second submission")
    slurm.run("scancel", str(other_id))
    ended = server.wait_state(other, "cancelled")
    assert (
        ended["reason"]
        == f"Slurm job {other_id} was cancelled in Slurm (scancel), not through the control plane"
    )


def test_drained_nodes_keep_jobs_queued_and_a_restart_finds_a_submission_it_never_stored(
    slurm, workspace, start_cp
):
    slurm.scontrol("update", f"nodename={ALL_NODES}", "state=drain", "reason=dflash-test-maintenance")
    held = start_cp(max_concurrent_jobs=0)  # submits nothing
    lost = held.submit(tiny_job(workspace, epochs=1, name="lost"))["id"]
    held.stop()
    # As if the control plane had died between sbatch and storing the id: a Slurm job of its name.
    name = f"dflash-{lost}.1"
    by_hand = int(
        slurm.run("sbatch", "--parsable", f"--job-name={name}", "--output=/dev/null", "--wrap=true").stdout
    )

    server = start_cp()  # the same store: a restart
    jid = server.submit(tiny_job(workspace, epochs=1))["id"]
    # Slurm's words for it: "Nodes required for job are DOWN, DRAINED or reserved ..." until its
    # scheduler has looked at the job, "ReqNodeNotAvail, UnavailableNodes:n[1-2]" after.
    for job_id in (lost, jid):
        wait_for(
            lambda job_id=job_id: re.search("DRAINED|UnavailableNodes", server.job(job_id)["reason"] or ""),
            what=f"job {job_id} to wait for the drained nodes",
        )
        assert server.job(job_id)["state"] == "queued"
    assert server.job(lost)["pid"] == by_hand  # adopted, not submitted a second time
    assert slurm.run("squeue", "--noheader", f"--name={name}", "--format=%i").stdout.split() == [str(by_hand)]
    assert f"control plane restarted: re-attached to Slurm job {by_hand}" in log_of(server, lost)

    slurm.scontrol("update", f"nodename={ALL_NODES}", "state=resume")
    assert server.wait_state(jid, "succeeded")["exit_code"] == 0
    assert server.wait_state(lost, "succeeded")["pid"] == by_hand  # its end is that Slurm job's
