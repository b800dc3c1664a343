"""/healthz, Prometheus /metrics, OpenAPI and docs, settings, and the `dflash control-plane` CLI."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from dflash_core import checkpoint as core_checkpoint
from services.control_plane import checkpoints
from services.control_plane.settings import ControlPlaneSettings
from tests.services.control_plane.harness import ROOT, ControlPlaneProcess, free_port

SAMPLE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+inf]+$', re.IGNORECASE)


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) dflash_control_plane_[a-z_]+ ", line), line
            continue
        assert SAMPLE.match(line), line
        name, _, value = line.rpartition(" ")
        metric, _, labels = name.partition("{")
        pairs = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels))
        samples[(metric, pairs)] = float(value)
    return samples


def test_prometheus_metrics_count_jobs_and_requests(server):
    for _ in range(3):
        server.submit({"data_path": "prepared", "save_path": None})
    server.client.get("/v1/jobs/nope")
    response = server.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "text/plain; version=0.0.4"
    )
    samples = parse(response.text)
    assert samples[("dflash_control_plane_jobs", frozenset({("state", "queued")}))] == 3
    assert samples[("dflash_control_plane_jobs", frozenset({("state", "running")}))] == 0
    posts = frozenset({("method", "POST"), ("route", "/v1/jobs"), ("status", "201")})
    assert samples[("dflash_control_plane_http_requests_total", posts)] == 3
    # The route template, not the raw path, labels a request: one series for every job id.
    missing = frozenset({("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404")})
    assert samples[("dflash_control_plane_http_requests_total", missing)] == 1
    route = frozenset({("method", "POST"), ("route", "/v1/jobs")})
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "dflash_control_plane_http_request_duration_seconds_bucket" and route <= labels
    )
    counts = [value for _, value in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf") and counts[-1] == 3
    assert samples[("dflash_control_plane_http_request_duration_seconds_count", route)] == 3
    again = parse(server.client.get("/metrics").text)
    metrics_route = frozenset({("method", "GET"), ("route", "/metrics"), ("status", "200")})
    assert again[("dflash_control_plane_http_requests_total", metrics_route)] == 1
    # Made-up methods and paths add no series of their own: past the first few (method `other`,
    # route `unmatched`), the scrape stays the same size however many come.
    sizes = []
    for round_ in range(2):
        for i in range(60):
            server.client.request(f"BREW{round_}X{i}", f"/v1/jobs/x{i}")
            server.client.request("GET", f"/made/up/{round_}/{i}")
        scrape = server.client.get("/metrics").text
        sizes.append(len(scrape.splitlines()))
        assert "BREW" not in scrape and "/made/up" not in scrape
    assert sizes[0] == sizes[1]


def test_healthz_openapi_and_docs(server):
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and health["schema_version"] >= 1 and health["executor"] == "local"
    spec = server.client.get("/openapi.json").json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/resume",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/metrics/stream",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/checkpoints",
        "/v1/jobs/{job_id}/checkpoints/{name}/archive",
        "/healthz",
        "/metrics",
    } <= set(spec["paths"])
    # The job spec is TrainConfig: its field docs reach the API docs.
    fields = spec["components"]["schemas"]["JobCreate"]["properties"]
    assert "Anchors (blocks) sampled per packed row." in fields["max_anchors"]["description"]
    assert spec["components"]["schemas"]["JobCreate"]["additionalProperties"] is False
    assert "swagger" in server.client.get("/docs").text.lower()


def test_settings_are_checked():
    assert ControlPlaneSettings(gpus="0,2,5").gpus == [0, 2, 5]
    assert ControlPlaneSettings(gpus="").gpus == []
    with pytest.raises(ValidationError, match="distinct"):
        ControlPlaneSettings(gpus="0,0")
    with pytest.raises(ValidationError, match="not a usable SQLAlchemy URL") as refused:
        ControlPlaneSettings(db="nosuchdialect://user:hunter2@host/db")
    assert "hunter2" not in str(refused.value.errors()[0]["msg"])
    assert ControlPlaneSettings(host="0.0.0.0", port=9000).own_url == "http://127.0.0.1:9000"
    assert ControlPlaneSettings(db="postgresql://u:p@h/db").database_url == "postgresql://u:p@h/db"


def test_checkpoint_file_names_are_the_trainers():
    # The control plane reads checkpoints without importing torch, so it repeats these names.
    assert checkpoints.CONFIG_FILE == core_checkpoint.CONFIG_FILE
    assert checkpoints.TRAINING_STATE_FILE == core_checkpoint.TRAINING_STATE_FILE
    assert (checkpoints.LATEST_LINK, checkpoints.BEST_LINK) == (
        core_checkpoint.LATEST_LINK,
        core_checkpoint.BEST_LINK,
    )


def test_cli_serves_on_the_given_port_and_refuses_bad_settings(tmp_path):
    run = [sys.executable, "-m", "services.cli.main", "control-plane"]
    bad = subprocess.run([*run, "--gpus", "1,1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--gpus" in bad.stdout
    missing = subprocess.run(
        [*run, "--token-file", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "--token-file" in missing.stdout
    port = free_port()
    url = f"sqlite:///{tmp_path / 'via-url.db'}"  # --db takes a SQLAlchemy URL as well as a path
    args = ["--db", url, "--data-root", str(tmp_path / "data"), "--checkpoint-root", str(tmp_path / "ckpt")]
    process = ControlPlaneProcess([*args, "--max-concurrent-jobs", "0"], port=port)
    try:
        job = process.submit({"data_path": "x"})
        assert job["config"]["save_path"] == str((tmp_path / "ckpt").resolve() / job["id"])
        assert (tmp_path / "via-url.db").is_file()
        assert (tmp_path / "via-url.db.jobs" / job["id"] / "train.log").is_file()  # beside the database
    finally:
        process.kill()


def test_every_flag_is_documented():
    docs = (ROOT / "docs" / "control_plane.md").read_text()
    for name in ControlPlaneSettings.model_fields:
        if name != "token":  # never a flag
            assert f"`--{name.replace('_', '-')}`" in docs, name
