"""Real training jobs on CPU through the REST API: the trainer is started by the control plane,
reports through its own control-plane metric sink, is cancelled, resumed and given GPUs.

The jobs train a tiny random verifier's drafter for a few seconds. Where a test needs a trainer
to hold still (to cancel it mid-run, or to keep its GPU busy) it pauses the process with SIGSTOP
instead of racing it: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import (
    TOKEN,
    cmdline_of,
    environ_of,
    free_port,
    trainer_of,
    wait_for,
)


def log_of(server, job_id: str) -> str:
    return server.client.get(f"/v1/jobs/{job_id}/logs", params={"lines": 10_000}).text


def test_a_job_trains_to_success_reporting_metrics_and_checkpoints(start_server, workspace):
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=1, token=TOKEN)
    job = server.submit(tiny_job(workspace, epochs=2, name="e2e"))
    jid = job["id"]
    launcher = server.wait_pid(jid)
    # The trainer gets a token of its own, through its environment only; it is good for this
    # job's metric posts and nothing else.
    trainer_token = environ_of(launcher)["DFLASH_CONTROL_PLANE_TOKEN"]
    assert trainer_token != TOKEN and jid in trainer_token
    assert trainer_token not in " ".join(cmdline_of(launcher))
    other = server.submit(tiny_job(workspace, name="queued behind it"))["id"]
    as_trainer = {"Authorization": f"Bearer {trainer_token}"}
    for method, path in [
        ("POST", f"/v1/jobs/{other}/cancel"),
        ("POST", "/v1/jobs"),
        ("GET", f"/v1/jobs/{jid}"),
    ]:
        refused = server.client.request(method, path, json={}, headers=as_trainer)
        assert refused.status_code == 403, (method, path, refused.text)
    assert server.client.post(f"/v1/jobs/{other}/cancel").json()["state"] == "cancelled"
    done = server.wait_state(jid, "succeeded")
    assert done["exit_code"] == 0 and done["reason"] is None and done["attempt"] == 1
    assert done["started_at"] and done["finished_at"] and done["gpus"] == []

    # Every row the trainer logged arrived, in order, through its own control-plane sink (it
    # authenticated with the token from its environment).
    rows = server.metric_rows(jid)
    save = Path(done["config"]["save_path"])
    on_disk = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in on_disk] and len(rows) > 5
    assert rows[0]["metrics"]["val/loss"] > 0 and rows[0]["step"] == 0  # the untrained baseline
    train = [r for r in rows if "train/loss" in r["metrics"]]
    assert train and {"train/eal", "train/acc_slot_1", "train/data_wait_frac"} <= set(train[-1]["metrics"])
    assert done["step"] == rows[-1]["step"] and done["epoch"] == 2.0 and done["total_steps"] == done["step"]

    listing = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    assert [c["name"] for c in listing["data"]] == ["0", "1"] and listing["latest"] == "1"
    history = json.loads((save / "1" / "training_state.json").read_text())["history"]
    val = {row["epoch"]: row["val/loss"] for row in history}
    assert [c["val_loss"] for c in listing["data"]] == [val[0], val[1]]
    assert listing["checkpoint_best"] == str(min((0, 1), key=val.get))
    assert listing["data"][1]["step"] == done["step"]

    archive = server.client.get(f"/v1/jobs/{jid}/checkpoints/latest/archive")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {f"latest/{p.name}": p.read_bytes() for p in (save / "1").iterdir()}
    assert {"latest/config.json", "latest/model.safetensors", "latest/training_state.json"} <= set(members)

    log = log_of(server, jid)
    assert "trained " in log and "exited with status 0: job succeeded" in log
    assert TOKEN not in log and trainer_token not in log
    for action in ("cancel", "resume"):
        refused = server.client.post(f"/v1/jobs/{jid}/{action}")
        assert refused.status_code == 409 and "it is succeeded" in refused.json()["detail"]
    assert server.client.delete(f"/v1/jobs/{jid}").status_code == 204
    assert (save / "1" / "model.safetensors").is_file()  # deleting a job keeps its checkpoints


def test_cancel_a_running_job_then_resume_it_from_its_checkpoint(start_server, workspace):
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=1)
    jid = server.submit(tiny_job(workspace, epochs=4))["id"]
    launcher = server.wait_pid(jid)
    server.wait_state(jid, "running")  # its first metric row arrived
    seen = wait_for(lambda: server.job(jid)["step"], what="a training step to be reported")
    trainer = trainer_of(launcher)
    os.kill(trainer, signal.SIGSTOP)  # hold it mid-run
    try:
        for action, method in (("delete", "DELETE"), ("resume", "POST")):
            url = f"/v1/jobs/{jid}" + ("" if action == "delete" else f"/{action}")
            refused = server.client.request(method, url)
            assert refused.status_code == 409 and "it is running" in refused.json()["detail"], action
        cancelling = server.client.post(f"/v1/jobs/{jid}/cancel").json()
        assert cancelling["state"] == "running" and cancelling["cancel_requested"]
        assert server.client.post(f"/v1/jobs/{jid}/cancel").json()["cancel_requested"]  # idempotent
        wait_for(lambda: "SIGTERM sent" in log_of(server, jid), what="the cancel's SIGTERM")
    finally:
        os.kill(trainer, signal.SIGCONT)
    cancelled = server.wait_state(jid, "cancelled")
    assert cancelled["exit_code"] == 143 and "checkpoint" in cancelled["reason"]
    assert "stopped by SIGTERM" in log_of(server, jid)
    listing = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    latest = next(c for c in listing["data"] if c["name"] == listing["latest"])
    stopped_at = latest["step"]
    assert stopped_at >= seen and latest["kind"] == "step"

    resumed = server.client.post(f"/v1/jobs/{jid}/resume").json()
    assert resumed["state"] == "queued" and resumed["attempt"] == 2
    done = server.wait_state(jid, "succeeded")
    assert done["attempt"] == 2 and done["exit_code"] == 0
    second = [r for r in server.metric_rows(jid) if r["attempt"] == 2]
    # Continued from the checkpoint: no untrained baseline at step 0, every step after it.
    assert second and min(r["step"] for r in second) > stopped_at
    assert f"resumed from {Path(done['config']['save_path'])}/{listing['latest']}" in log_of(server, jid)
    final = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    assert final["latest"] == "3"


def test_gpus_are_never_shared_and_jobs_wait_for_them(start_server, workspace):
    server = start_server(data_root=workspace["root"], gpus=[0, 1], max_concurrent_jobs=3)
    a, b, c = (server.submit(tiny_job(workspace, epochs=1, gpus=1, name=n))["id"] for n in "abc")
    paused = []
    try:
        for jid in (a, b):  # hold both GPU jobs where they are, whatever state they reached
            pid = server.wait_pid(jid)
            os.killpg(pid, signal.SIGSTOP)
            paused.append(pid)
        cpu = server.submit(tiny_job(workspace, epochs=1, gpus=0, name="cpu"))["id"]
        server.wait_ticks(3)
        assert server.job(c)["state"] == "queued"  # both GPUs busy
        assert server.client.get("/healthz").json()["gpus_free"] == []
        gpus = {jid: server.job(jid)["gpus"] for jid in (a, b)}
        assert sorted(gpus[a] + gpus[b]) == [0, 1]
        for jid, pid in zip((a, b), paused, strict=True):
            assert environ_of(pid)["CUDA_VISIBLE_DEVICES"] == str(gpus[jid][0])
        # A CPU job needs no GPU: it runs meanwhile, and sees none.
        cpu_pid = server.wait_pid(cpu)
        assert environ_of(cpu_pid)["CUDA_VISIBLE_DEVICES"] == ""
        assert server.wait_state(cpu, "succeeded")["gpus"] == []
        assert server.job(c)["state"] == "queued"
    finally:
        for pid in paused:
            os.killpg(pid, signal.SIGCONT)
    for jid in (a, b, c):
        server.wait_state(jid, "succeeded")
    assert server.job(c)["gpus"][0] in (0, 1)


def test_a_failing_trainer_fails_the_job_with_its_last_lines(start_server, workspace):
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=1)
    (workspace["root"] / "empty").mkdir(exist_ok=True)
    jid = server.submit(tiny_job(workspace, data_path=str(workspace["root"] / "empty")))["id"]
    failed = server.wait_state(jid, "failed")
    assert failed["exit_code"] not in (0, None)
    assert failed["reason"].startswith(f"trainer exited with status {failed['exit_code']}:\n")
    trainer_lines = [
        line for line in log_of(server, jid).splitlines() if not line.startswith("[control plane")
    ]
    assert trainer_lines[-1] in failed["reason"]
    assert server.client.post(f"/v1/jobs/{jid}/cancel").status_code == 409
    assert server.client.post(f"/v1/jobs/{jid}/resume").json()["attempt"] == 2
    assert server.wait_state(jid, "failed")["attempt"] == 2
    assert server.client.delete(f"/v1/jobs/{jid}").status_code == 204


def test_a_starting_job_can_be_cancelled_and_a_stuck_one_is_killed(start_server, workspace):
    # A hidden-state service that is not there keeps the trainer in `starting` (it waits for
    # the service before its first step), for as long as we like.
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=2, cancel_grace_s=1.0)
    nowhere = [f"127.0.0.1:{free_port()}"]
    body = tiny_job(workspace, hidden_states_endpoint=nowhere, service_timeout_s=600)
    first = server.submit({**body, "name": "waits"})["id"]
    server.wait_pid(first)
    assert server.job(first)["state"] == "starting"
    for action, method in (("delete", "DELETE"), ("resume", "POST")):
        url = f"/v1/jobs/{first}" + ("" if action == "delete" else f"/{action}")
        refused = server.client.request(method, url)
        assert refused.status_code == 409 and "it is starting" in refused.json()["detail"], action
    server.client.post(f"/v1/jobs/{first}/cancel").raise_for_status()
    cancelled = server.wait_state(first, "cancelled")
    assert (
        cancelled["exit_code"] == 143 and cancelled["reason"] == "cancelled before its first step (exit 143)"
    )

    # A trainer that does not react to SIGTERM (here: stopped) is killed after the grace period.
    second = server.submit({**body, "save_path": "stuck"})["id"]
    trainer = trainer_of(server.wait_pid(second))
    os.kill(trainer, signal.SIGSTOP)
    server.client.post(f"/v1/jobs/{second}/cancel").raise_for_status()
    killed = server.wait_state(second, "cancelled")
    assert killed["exit_code"] == 128 + signal.SIGKILL and "was killed" in killed["reason"]
    assert "SIGKILL sent" in log_of(server, second)
    assert (
        not Path(f"/proc/{trainer}").exists() or "Z" in Path(f"/proc/{trainer}/stat").read_text().split()[2]
    )


def test_a_full_disk_under_the_job_log_never_loses_the_trainers_end_state(start_server, workspace):
    """The log is /dev/full (every write: ENOSPC): the job still ends, with its real exit state,
    and the queue moves on."""
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=1, cancel_grace_s=1.0)
    (workspace["root"] / "empty").mkdir(exist_ok=True)
    holder = server.submit(tiny_job(workspace, hidden_states_endpoint=[f"127.0.0.1:{free_port()}"]))["id"]
    server.wait_pid(holder)  # the slot is taken: the next job stays queued
    doomed = server.submit(
        {**tiny_job(workspace, data_path=str(workspace["root"] / "empty")), "save_path": "full"}
    )
    log = Path(server.settings.resolved_jobs_dir) / doomed["id"] / "train.log"
    log.unlink()
    log.symlink_to("/dev/full")
    server.client.post(f"/v1/jobs/{holder}/cancel").raise_for_status()
    failed = server.wait_state(doomed["id"], "failed")
    assert failed["exit_code"] not in (0, None)
    after = server.submit({**tiny_job(workspace), "save_path": "after"})["id"]
    server.wait_pid(after)  # the queue was not blocked
