"""Metric sinks: TensorBoard, the trackers, the control plane, and `build_metric_sinks`.

The control plane does not exist yet; its metrics route is stood in for by a real FastAPI app
served by uvicorn on 127.0.0.1, which records what arrives. wandb, trackio and mlflow are tested
for real (offline or against a local store) where they are installed, and skipped elsewhere; the
"requested but not installed" error is tested where they are not.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from dflash_core.config import TrainConfig
from services.trainer.metric_sinks.control_plane import TOKEN_ENV, read_token
from services.trainer.metrics import (
    ControlPlaneSink,
    JsonlSink,
    LoggingSink,
    MetricBackendMissing,
    MetricSinks,
    TensorBoardSink,
    build_metric_sinks,
)

CONTROL_PLANE_LOGGER = "services.trainer.metric_sinks.control_plane"


def wait_for(condition: Callable[[], bool], *, what: str, timeout_s: float = 30.0) -> None:
    """Poll until `condition()` holds; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def train_config(tmp_path: Path, **fields: Any) -> TrainConfig:
    return TrainConfig(data_path=tmp_path / "data", save_path=tmp_path / "ckpt", **fields)


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------- the stand-in control plane
@dataclass
class Received:
    job_id: str
    authorization: str | None
    rows: list[dict[str, Any]]
    status: int


class StandInControlPlane:
    """`POST /v1/jobs/{job_id}/metrics` as the control plane will serve it: 404 for an unknown job,
    503 for the first `unavailable_for` requests, else 200. Records every request."""

    def __init__(self, *, known_jobs: set[str], port: int = 0, unavailable_for: int = 0) -> None:
        self.requests: list[Received] = []
        self._unavailable_for = unavailable_for
        app = FastAPI()

        @app.post("/v1/jobs/{job_id}/metrics")
        async def receive(job_id: str, request: Request) -> JSONResponse:
            body = await request.json()
            if job_id not in known_jobs:
                status, answer = 404, {"detail": f"job {job_id} is unknown"}
            elif self._unavailable_for > 0:
                self._unavailable_for -= 1
                status, answer = 503, {"detail": "starting up"}
            else:
                status, answer = 200, {"accepted": len(body["rows"])}
            self.requests.append(Received(job_id, request.headers.get("authorization"), body["rows"], status))
            return JSONResponse(answer, status_code=status)

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self.server.started, what="the stand-in control plane to start")
        self.port: int = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def accepted_rows(self, job_id: str) -> list[dict[str, Any]]:
        """Rows of the requests answered 200, in arrival order (a 503'd request is sent again)."""
        return [row for r in self.requests if r.job_id == job_id and r.status == 200 for row in r.rows]

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture
def control_plane() -> Iterator[StandInControlPlane]:
    server = StandInControlPlane(known_jobs={"job-1"})
    yield server
    server.stop()


def free_port() -> int:
    """A port nothing listens on: the control plane 'down'. A server is started on it later."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fast_sink(url: str, **kwargs: Any) -> ControlPlaneSink:
    """Short backoff so retries happen within the test; everything else as in production."""
    return ControlPlaneSink(url=url, min_backoff_s=0.01, max_backoff_s=0.1, **kwargs)


# ---------------------------------------------------------------------- control plane sink
def test_rows_reach_the_control_plane_in_order_with_the_bearer_token(
    tmp_path, control_plane, monkeypatch, caplog
):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    caplog.set_level(logging.DEBUG)
    config = train_config(tmp_path, report_to=[], control_plane_url=control_plane.url, job_id="job-1")
    sinks = build_metric_sinks(config, rank=0)
    assert [type(s) for s in sinks.sinks] == [LoggingSink, ControlPlaneSink]
    for step in range(1, 31):
        sinks.log({"train/loss": 1.0 / step, "train/eal": 1.0 + step / 100}, step)
    sinks.log({"val/loss": math.nan}, 31)
    sinks.close()

    rows = control_plane.accepted_rows("job-1")
    assert [row["step"] for row in rows] == list(range(1, 32))
    assert rows[0]["metrics"] == {"train/loss": 1.0, "train/eal": 1.01}
    assert rows[-1]["metrics"] == {"val/loss": None}  # JSON has no NaN
    assert all(isinstance(row["time"], float) for row in rows)
    assert {r.authorization for r in control_plane.requests} == {"Bearer s3cret-token"}
    assert "s3cret-token" not in caplog.text


def test_token_file_wins_over_the_environment_and_an_empty_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token(token_file) == "from-file"
    assert read_token(None) == "from-env"
    monkeypatch.delenv(TOKEN_ENV)
    assert read_token(None) is None
    token_file.write_text("  \n")
    with pytest.raises(ValueError, match=r"--control-plane-token-file .* is empty"):
        read_token(token_file)
    with pytest.raises(ValueError, match="cannot read it"):
        read_token(tmp_path / "missing")


def test_a_control_plane_that_is_down_then_back_gets_the_buffered_rows(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=CONTROL_PLANE_LOGGER)
    port = free_port()
    sink = fast_sink(f"http://127.0.0.1:{port}", job_id="job-1", token="t")
    for step in range(10):
        sink.log({"train/loss": float(step)}, step)
    wait_for(lambda: sink.failed_attempts >= 3, what="the sink to find the control plane down")
    for step in range(10, 20):
        sink.log({"train/loss": float(step)}, step)

    server = StandInControlPlane(known_jobs={"job-1"}, port=port)
    try:
        wait_for(lambda: sink.delivered == 20, what="the buffered rows to be delivered")
        sink.log({"train/loss": 20.0}, 20)
        sink.close()
    finally:
        server.stop()
    rows = server.accepted_rows("job-1")
    assert [row["step"] for row in rows] == list(range(21))
    assert [row["metrics"]["train/loss"] for row in rows] == [float(s) for s in range(21)]
    assert sink.dropped == 0
    unreachable = [m for m in warnings_from(caplog, CONTROL_PLANE_LOGGER) if "unreachable" in m]
    assert len(unreachable) == 1, unreachable  # one warning for the outage, not one per retry


def test_a_full_buffer_drops_the_oldest_rows_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=CONTROL_PLANE_LOGGER)
    port = free_port()
    sink = fast_sink(f"http://127.0.0.1:{port}", job_id="job-1", max_rows=5)
    sink.log({"train/loss": 0.0}, 0)
    wait_for(lambda: sink.failed_attempts >= 1, what="the sink to find the control plane down")
    for step in range(1, 12):
        sink.log({"train/loss": float(step)}, step)
    # After a failure the batch that was in flight is back in the buffer and the buffer is trimmed.
    attempts = sink.failed_attempts
    wait_for(lambda: sink.failed_attempts > attempts, what="another failed attempt")
    assert sink.dropped == 7
    drop_warnings = [m for m in warnings_from(caplog, CONTROL_PLANE_LOGGER) if "dropping the oldest" in m]
    assert len(drop_warnings) == 1

    server = StandInControlPlane(known_jobs={"job-1"}, port=port)
    try:
        wait_for(lambda: sink.delivered == 5, what="the kept rows to be delivered")
        sink.close()
    finally:
        server.stop()
    assert [row["step"] for row in server.accepted_rows("job-1")] == [7, 8, 9, 10, 11]
    assert any(
        "7 metric rows" in m and "dropped in all" in m for m in warnings_from(caplog, CONTROL_PLANE_LOGGER)
    )


def test_server_errors_are_retried_without_losing_or_repeating_rows(tmp_path):
    server = StandInControlPlane(known_jobs={"job-1"}, unavailable_for=3)
    try:
        sink = fast_sink(server.url, job_id="job-1", batch_rows=4)
        for step in range(10):
            sink.log({"train/loss": float(step)}, step)
        wait_for(lambda: sink.delivered == 10, what="every row to be delivered")
        sink.close()
    finally:
        server.stop()
    assert [r.status for r in server.requests[:3]] == [503, 503, 503]
    assert sink.failed_attempts == 3
    assert [row["step"] for row in server.accepted_rows("job-1")] == list(range(10))


def test_a_4xx_stops_sending_with_one_warning(tmp_path, control_plane, caplog):
    caplog.set_level(logging.WARNING, logger=CONTROL_PLANE_LOGGER)
    sink = fast_sink(control_plane.url, job_id="no-such-job")
    sink.log({"train/loss": 1.0}, 1)
    wait_for(lambda: sink.refused, what="the sink to give up on the unknown job")
    for step in range(2, 10):
        sink.log({"train/loss": 1.0}, step)
    sink.close()
    assert len(control_plane.requests) == 1  # no retries, nothing sent after the refusal
    assert control_plane.requests[0].job_id == "no-such-job"
    warnings = warnings_from(caplog, CONTROL_PLANE_LOGGER)
    assert len(warnings) == 1 and "HTTP 404" in warnings[0] and "unknown" in warnings[0]


def test_close_gives_up_at_its_deadline_when_the_control_plane_stays_down(caplog):
    caplog.set_level(logging.WARNING, logger=CONTROL_PLANE_LOGGER)
    sink = fast_sink(f"http://127.0.0.1:{free_port()}", job_id="job-1", close_timeout_s=0.5)
    for step in range(3):
        sink.log({"train/loss": 1.0}, step)
    sink.close()
    assert sink.delivered == 0
    assert any("3 metric rows were not delivered" in m for m in warnings_from(caplog, CONTROL_PLANE_LOGGER))


# ---------------------------------------------------------------------- TensorBoard
def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_sink_writes_scalars_and_a_resume_hides_what_it_redoes(tmp_path):
    log_dir = tmp_path / "tensorboard"
    first = TensorBoardSink(log_dir)
    for step in (10, 20, 30):
        first.log({"train/loss": float(step), "train/acc_slot_1": 0.5}, step)
    first.close()
    assert scalars(log_dir, "train/loss") == [(10, 10.0), (20, 20.0), (30, 30.0)]
    assert scalars(log_dir, "train/acc_slot_1") == [(10, 0.5), (20, 0.5), (30, 0.5)]
    # Event files are read in name order, which starts with the creation second; a real resume
    # comes later than the run it continues, which two writers in one test may not.
    (old,) = log_dir.glob("events.out.tfevents.*")
    parts = old.name.split(".")
    parts[3] = f"{int(parts[3]) - 60:010d}"
    old.rename(old.with_name(".".join(parts)))

    resumed = TensorBoardSink(log_dir)  # resumed from the checkpoint at step 10
    for step in (20, 30, 40):
        resumed.log({"train/loss": -float(step)}, step)
    resumed.close()
    assert scalars(log_dir, "train/loss") == [(10, 10.0), (20, -20.0), (30, -30.0), (40, -40.0)]


# ---------------------------------------------------------------------- build_metric_sinks
def test_default_sinks_are_the_log_jsonl_and_tensorboard_on_rank_0_only(tmp_path):
    config = train_config(tmp_path)
    assert config.report_to == ["jsonl", "tensorboard"]
    other_rank = build_metric_sinks(config, rank=1)
    assert other_rank.sinks == []
    other_rank.log({"train/loss": 1.0}, 1)
    other_rank.close()
    assert not config.save_path.exists()  # other ranks write nothing

    sinks = build_metric_sinks(config, rank=0)
    assert [type(s) for s in sinks.sinks] == [LoggingSink, JsonlSink, TensorBoardSink]
    sinks.log({"train/loss": 2.5, "train/eal": 1.75}, 10)
    sinks.close()
    (row,) = [json.loads(line) for line in (config.save_path / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 10 and row["train/loss"] == 2.5 and row["train/eal"] == 1.75
    assert scalars(config.save_path / "tensorboard", "train/eal") == [(10, 1.75)]


@pytest.mark.parametrize("backend", ["wandb", "trackio", "mlflow"])
def test_a_requested_tracker_that_is_not_installed_fails_at_start_naming_the_package(tmp_path, backend):
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    config = train_config(tmp_path, report_to=["jsonl", backend])
    for rank in (0, 1):  # every rank fails, so none is left waiting for the others
        with pytest.raises(MetricBackendMissing, match=f"pip install {backend}"):
            build_metric_sinks(config, rank=rank)
    assert not config.save_path.exists()  # refused before anything was opened


def test_control_plane_url_and_job_id_come_together():
    with pytest.raises(ValidationError, match="--control-plane-url needs --job-id"):
        TrainConfig(data_path="d", save_path="s", control_plane_url="http://cp")
    with pytest.raises(ValidationError, match="--job-id needs --control-plane-url"):
        TrainConfig(data_path="d", save_path="s", job_id="job-1")
    with pytest.raises(ValidationError, match="report_to"):
        TrainConfig(data_path="d", save_path="s", report_to=["comet"])


def test_a_failing_sink_does_not_stop_the_others(tmp_path, caplog):
    broken = JsonlSink(tmp_path / "broken.jsonl")
    broken.close()  # writing to it now raises
    working = JsonlSink(tmp_path / "working.jsonl")
    sinks = MetricSinks([broken, working])
    with caplog.at_level(logging.ERROR, logger="services.trainer.metric_sinks.base"):
        for step in (1, 2, 3):
            sinks.log({"train/loss": 1.0}, step)
    sinks.close()
    lines = (tmp_path / "working.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert len([r for r in caplog.records if "JsonlSink failed" in r.getMessage()]) == 1


# ---------------------------------------------------------------------- the trackers, where installed
def test_wandb_sink_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = build_metric_sinks(train_config(tmp_path, report_to=["wandb"], run_name="wandb-test"), rank=0)
    wandb_sink = sinks.sinks[1]
    sinks.log({"train/loss": 2.0, "train/acc_slot_1": 0.25}, 10)
    sinks.log({"train/loss": 1.5, "train/acc_slot_1": 0.5}, 20)
    sinks.log({"val/loss": 1.75}, 20)  # epoch-end validation shares the step of a train row
    sinks.log({"train/loss": 1.0}, 30)  # wandb commits a step when the next one starts
    summary = wandb_sink._run.summary
    assert (summary["_step"], summary["train/loss"], summary["val/loss"]) == (20, 1.5, 1.75)
    assert wandb_sink._run.name == "wandb-test"
    sinks.close()
    # wandb-core writes the run file in the background, after finish() returns: only its place is
    # certain here (<save-path>/wandb), not yet its contents.
    assert len(list((tmp_path / "ckpt" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_trackio_sink_local(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    sinks = build_metric_sinks(train_config(tmp_path, report_to=["trackio"], run_name="trackio-test"), rank=0)
    sinks.log({"train/loss": 2.0}, 10)
    sinks.log({"train/loss": 1.5, "val/loss": 1.75}, 20)
    sinks.close()
    logs = SQLiteStorage.get_logs("dflash", "trackio-test")
    assert [(row["step"], row["train/loss"]) for row in logs] == [(10, 2.0), (20, 1.5)]
    assert logs[1]["val/loss"] == 1.75


def test_mlflow_sink_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # no database needed for a test
    config = train_config(tmp_path, report_to=["mlflow"], run_name="mlflow-test", lr=1e-3)
    sinks = build_metric_sinks(config, rank=0)
    run_id = sinks.sinks[1].run_id
    sinks.log({"train/loss": 2.0}, 10)
    sinks.log({"train/loss": 1.5}, 20)
    sinks.close()
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.0), (20, 1.5)]
    run = client.get_run(run_id)
    assert run.info.run_name == "mlflow-test" and run.data.params["lr"] == "0.001"
