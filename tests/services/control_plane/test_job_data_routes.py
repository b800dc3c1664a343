"""Metric rows, logs and checkpoints routes over real HTTP (history, live streams, archives).

Rows are posted here the way the trainer's control-plane sink posts them; checkpoint folders
are written in the trainer's layout. test_end_to_end.py does both with a real trainer.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import httpx

from tests.services.control_plane.harness import ControlPlaneServer, next_event, sse_events, wait_for


def queued_job(server: ControlPlaneServer) -> str:
    return server.submit({"data_path": "prepared"})["id"]


def rows(*steps: int, **metrics: float | None) -> dict:
    return {
        "rows": [
            {"step": s, "time": 1767225600.0 + s, "metrics": {"train/loss": 1.0 / (s + 1), **metrics}}
            for s in steps
        ]
    }


# ---------------------------------------------------------------------- metrics
def test_metric_rows_history_in_arrival_order_with_filters(server):
    jid = queued_job(server)
    assert server.client.post(f"/v1/jobs/{jid}/metrics", json=rows(0, 5, 10)).json() == {"accepted": 3}
    posted = {"rows": [{"step": 15, "time": 2.0, "metrics": {"val/loss": None, "epoch": 0.0}, "later": 1}]}
    assert server.client.post(f"/v1/jobs/{jid}/metrics", json=posted).status_code == 200  # extra keys ignored
    history = server.metric_rows(jid)
    assert [r["step"] for r in history] == [0, 5, 10, 15]
    assert history[0]["metrics"] == {"train/loss": 1.0} and history[3]["metrics"]["val/loss"] is None
    assert all(r["attempt"] == 1 for r in history)
    ids = [r["id"] for r in history]
    assert ids == sorted(ids)
    assert [r["step"] for r in server.metric_rows(jid, since_step=10)] == [10, 15]
    assert [r["step"] for r in server.metric_rows(jid, after_id=ids[1])] == [10, 15]
    assert [r["step"] for r in server.metric_rows(jid, limit=2)] == [0, 5]
    job = server.job(jid)
    # Progress from the newest rows: a val row at epoch 0 means one epoch done.
    assert job["step"] == 15 and job["epoch"] == 1.0 and job["total_steps"] == 15 * 5


def test_bad_metric_rows_are_422(server):
    jid = queued_job(server)
    for bad in (
        {"rows": [{"step": -1, "time": 0, "metrics": {}}]},
        {"rows": [{"time": 0, "metrics": {}}]},
        {},
    ):
        assert server.client.post(f"/v1/jobs/{jid}/metrics", json=bad).status_code == 422
    assert server.metric_rows(jid) == []


def test_a_finished_job_takes_no_more_metric_rows(server):
    jid = queued_job(server)
    assert server.client.post(f"/v1/jobs/{jid}/metrics", json=rows(0)).json() == {"accepted": 1}
    server.client.post(f"/v1/jobs/{jid}/cancel").raise_for_status()  # queued -> cancelled
    late = server.client.post(f"/v1/jobs/{jid}/metrics", json=rows(5))
    assert late.status_code == 409 and "cancelled" in late.json()["detail"]
    assert [r["step"] for r in server.metric_rows(jid)] == [0]


def test_metric_stream_sends_history_then_live_rows_then_end(server):
    jid = queued_job(server)
    server.client.post(f"/v1/jobs/{jid}/metrics", json=rows(0, 5)).raise_for_status()
    with httpx.Client(base_url=server.url, timeout=30) as reader:
        with reader.stream("GET", f"/v1/jobs/{jid}/metrics/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.iter_lines())
            first = next_event(events, "job")
            assert first["data"]["state"] == "queued" and first["data"]["id"] == jid
            old = [next_event(events, "metrics"), next_event(events, "metrics")]
            assert [e["data"]["step"] for e in old] == [0, 5]
            assert [int(e["id"]) for e in old] == [e["data"]["id"] for e in old]
            # Live: posted after the stream opened.
            server.client.post(f"/v1/jobs/{jid}/metrics", json=rows(10)).raise_for_status()
            assert next_event(events, "metrics")["data"]["step"] == 10
            server.client.post(f"/v1/jobs/{jid}/cancel").raise_for_status()
            assert next_event(events, "job")["data"]["state"] == "cancelled"
            assert next_event(events, "end")["data"] == {"job_id": jid, "state": "cancelled"}
        # Reconnecting with Last-Event-ID resumes after that row (as EventSource does).
        headers = {"Last-Event-ID": old[1]["id"]}
        with reader.stream("GET", f"/v1/jobs/{jid}/metrics/stream", headers=headers) as response:
            steps = [
                json.loads(e["data"])["step"]
                for e in sse_events(response.iter_lines())
                if e.get("event") == "metrics"
            ]
        assert steps == [10]
        with reader.stream("GET", f"/v1/jobs/{jid}/metrics/stream", params={"since_step": 5}) as response:
            steps = [
                json.loads(e["data"])["step"]
                for e in sse_events(response.iter_lines())
                if e.get("event") == "metrics"
            ]
        assert steps == [5, 10]


# ---------------------------------------------------------------------- logs
def test_log_tail_and_follow_until_the_job_ends(server):
    jid = queued_job(server)
    log = server.settings.resolved_jobs_dir / jid / "train.log"
    with open(log, "a") as handle:  # as the trainer writes it: progress bars rewrite with \r
        handle.write("loading verifier\nepoch 0:  10%\repoch 0:  50%\repoch 0: 100%\nstep 5 train/loss=2.0\n")
    tail = server.client.get(f"/v1/jobs/{jid}/logs", params={"lines": 2})
    assert tail.status_code == 200 and tail.text == "epoch 0: 100%\nstep 5 train/loss=2.0\n"
    everything = server.client.get(f"/v1/jobs/{jid}/logs", params={"lines": 1000}).text.splitlines()
    assert everything[0].startswith("[control plane") and "submitted" in everything[0]
    assert server.client.get(f"/v1/jobs/{jid}/logs", params={"lines": 0}).text == ""

    received: list[str] = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as reader,
        reader.stream("GET", f"/v1/jobs/{jid}/logs", params={"lines": 1, "follow": True}) as response,
    ):
        lines = response.iter_lines()
        received.append(next(lines))
        with open(log, "a") as handle:
            handle.write("step 10 train/loss=1.5\n")
        received.append(next(lines))
        server.client.post(f"/v1/jobs/{jid}/cancel").raise_for_status()
        received += list(lines)  # ends by itself once the job has ended
    assert received[:2] == ["step 5 train/loss=2.0", "step 10 train/loss=1.5"]
    assert "cancel requested" in received[-1]


def test_log_follow_as_server_sent_events(server):
    jid = queued_job(server)
    headers = {"Accept": "text/event-stream"}
    with (
        httpx.Client(base_url=server.url, timeout=30, headers=headers) as reader,
        reader.stream("GET", f"/v1/jobs/{jid}/logs", params={"follow": True, "lines": 5}) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
        first = next(events)
        assert first["event"] == "log" and "submitted" in first["data"] and int(first["id"]) > 0
        server.client.post(f"/v1/jobs/{jid}/cancel").raise_for_status()
        rest = list(events)
    assert "cancel requested" in rest[0]["data"] and rest[-1] == {"event": "end", "data": "cancelled"}


# ---------------------------------------------------------------------- checkpoints
def write_checkpoint(folder: Path, *, step: int, history: list[dict] | None = None) -> None:
    """A checkpoint folder in the trainer's layout (contents are placeholders of the right names)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"speculators_model_type": "dflash"}))
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "optimizer_state_dict.pt").write_bytes(os.urandom(500))
    state = {"format_version": 1, "epoch": 0, "global_step": step, "history": history or []}
    (folder / "training_state.json").write_text(json.dumps(state))


def test_checkpoints_list_and_archive(server):
    jid = queued_job(server)
    save = Path(server.job(jid)["config"]["save_path"])
    history = [{"epoch": -1, "val/loss": 5.0}, {"epoch": 0, "val/loss": 3.5}, {"epoch": 1, "val/loss": 3.25}]
    write_checkpoint(save / "0", step=54, history=history[:2])
    write_checkpoint(save / "1", step=108, history=history)
    write_checkpoint(save / "step-00000120", step=120, history=history)
    (save / "tensorboard").mkdir()
    (save / ".tmp-abc").mkdir()  # an unfinished write: never listed
    (save / "metrics.jsonl").write_text("{}\n")
    os.symlink("step-00000120", save / "latest")
    os.symlink("1", save / "checkpoint_best")

    listing = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    assert listing["save_path"] == str(save)
    assert [(c["name"], c["kind"], c["epoch"], c["step"], c["val_loss"]) for c in listing["data"]] == [
        ("0", "epoch", 0, 54, 3.5),
        ("1", "epoch", 1, 108, 3.25),
        ("step-00000120", "step", None, 120, None),
    ]
    assert listing["latest"] == "step-00000120" and listing["checkpoint_best"] == "1"
    assert listing["data"][0]["size_bytes"] == sum(p.stat().st_size for p in (save / "0").iterdir())

    for name, folder in (("checkpoint_best", "1"), ("0", "0")):
        response = server.client.get(f"/v1/jobs/{jid}/checkpoints/{name}/archive")
        assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
        assert f"{jid}-{name}.tar.gz" in response.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        expected = {f"{name}/{p.name}": p.read_bytes() for p in (save / folder).iterdir()}
        assert members == expected

    for bad in ("2", "tensorboard", ".tmp-abc", "metrics.jsonl", "..", "step-1"):
        assert server.client.get(f"/v1/jobs/{jid}/checkpoints/{bad}/archive").status_code == 404, bad
    assert server.client.get(f"/v1/jobs/{jid}/checkpoints/..%2F..%2Fetc/archive").status_code == 404


def test_checkpoint_links_pointing_outside_are_not_followed(server, tmp_path):
    jid = queued_job(server)
    save = Path(server.job(jid)["config"]["save_path"])
    write_checkpoint(tmp_path / "elsewhere" / "0", step=1)
    save.mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "0", save / "latest")
    listing = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    assert listing["data"] == [] and listing["latest"] is None
    assert server.client.get(f"/v1/jobs/{jid}/checkpoints/latest/archive").status_code == 404


def test_a_job_without_checkpoints_lists_none(server):
    jid = queued_job(server)
    listing = server.client.get(f"/v1/jobs/{jid}/checkpoints").json()
    assert listing["data"] == [] and listing["latest"] is None and listing["checkpoint_best"] is None


def test_archive_download_abandoned_midway_frees_the_producer(server):
    jid = queued_job(server)
    save = Path(server.job(jid)["config"]["save_path"])
    write_checkpoint(save / "0", step=1)
    (save / "0" / "model.safetensors").write_bytes(os.urandom(32 << 20))  # far more than the queue holds

    def producers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "archive-0"]

    with (
        httpx.Client(base_url=server.url, timeout=30) as reader,
        reader.stream("GET", f"/v1/jobs/{jid}/checkpoints/0/archive") as response,
    ):
        next(response.iter_bytes())
        assert producers()  # blocked on the full queue: the reader is slow
    wait_for(lambda: not producers(), what="the archive thread to stop after the client left", timeout_s=60)
    full = server.client.get(f"/v1/jobs/{jid}/checkpoints/0/archive")  # and the next download is whole
    with tarfile.open(fileobj=io.BytesIO(full.content), mode="r:gz") as tar:
        assert (
            tar.extractfile("0/model.safetensors").read() == (save / "0" / "model.safetensors").read_bytes()
        )
