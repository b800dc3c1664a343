"""The bearer token: required on mutating routes and archive downloads when configured, never leaked."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from services.control_plane.settings import ControlPlaneSettings
from tests.services.control_plane.harness import TOKEN

MUTATING = [
    ("POST", "/v1/jobs", {"data_path": "prepared"}),
    ("POST", "/v1/jobs/{id}/cancel", None),
    ("POST", "/v1/jobs/{id}/resume", None),
    ("DELETE", "/v1/jobs/{id}", None),
    ("POST", "/v1/jobs/{id}/metrics", {"rows": [{"step": 1, "time": 1.0, "metrics": {"train/loss": 1.0}}]}),
    ("GET", "/v1/jobs/{id}/checkpoints/latest/archive", None),
]
READS = [
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/metrics",
    "/v1/jobs/{id}/logs",
    "/v1/jobs/{id}/checkpoints",
]


@pytest.fixture
def secured(start_server):
    return start_server(max_concurrent_jobs=0, token=TOKEN)


def test_mutating_routes_need_the_token(secured):
    jid = secured.submit({"data_path": "prepared"})["id"]  # the fixture's client sends the token
    with httpx.Client(base_url=secured.url, timeout=30) as anonymous:
        for method, path, payload in MUTATING:
            url = path.format(id=jid)
            missing = anonymous.request(method, url, json=payload)
            assert missing.status_code == 401, (method, path)
            assert missing.headers["www-authenticate"] == "Bearer"
            for header in ("Bearer wrong-token", f"Basic {TOKEN}", "Bearer", TOKEN):
                wrong = anonymous.request(method, url, json=payload, headers={"Authorization": header})
                assert wrong.status_code == (403 if header == "Bearer wrong-token" else 401), (method, header)
        for path in READS:  # reading needs no token
            assert anonymous.get(path.format(id=jid)).status_code == 200, path
        assert secured.job(jid)["state"] == "queued" and secured.metric_rows(jid) == []
    # With the token, each of them goes through.
    assert secured.client.post(f"/v1/jobs/{jid}/metrics", json=MUTATING[4][2]).status_code == 200
    assert secured.client.post(f"/v1/jobs/{jid}/cancel").json()["state"] == "cancelled"
    assert secured.client.post(f"/v1/jobs/{jid}/resume").json()["state"] == "queued"
    assert secured.client.get(f"/v1/jobs/{jid}/checkpoints/latest/archive").status_code == 404  # none yet
    assert secured.client.delete(f"/v1/jobs/{jid}").status_code == 204
    assert secured.client.get("/healthz").json()["auth"] is True


def test_without_a_token_every_route_is_open(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        job = anonymous.post("/v1/jobs", json={"data_path": "prepared"})
        assert job.status_code == 201
        assert anonymous.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    assert server.client.get("/healthz").json()["auth"] is False


def test_the_token_appears_in_no_output_record_or_log(secured):
    token_file = Path(secured.settings.data_root) / "token.txt"
    token_file.write_text(TOKEN)
    job = secured.submit({"data_path": "prepared", "control_plane_token_file": "token.txt", "name": "t"})
    jid = job["id"]
    secured.client.post(f"/v1/jobs/{jid}/metrics", json=MUTATING[4][2]).raise_for_status()
    secured.client.post(f"/v1/jobs/{jid}/cancel").raise_for_status()
    assert job["config"]["control_plane_token_file"] == str(token_file.resolve())  # the path, not the content
    outputs = [
        secured.client.get(path).text
        for path in [
            "/v1/jobs",
            f"/v1/jobs/{jid}",
            f"/v1/jobs/{jid}/logs",
            "/metrics",
            "/healthz",
            "/openapi.json",
        ]
    ]
    outputs.append(json.dumps(secured.metric_rows(jid)))
    assert all(TOKEN not in text for text in outputs)
    db = Path(secured.settings.db)
    stored = [db, *db.parent.glob("jobs.db*")]  # the database, its WAL, and every job file
    stored += [p for p in secured.settings.resolved_jobs_dir.rglob("*") if p.is_file()]
    assert len(stored) > 3
    for path in stored:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_token_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_CONTROL_PLANE_TOKEN", "from-env")
    assert ControlPlaneSettings().token_value == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert ControlPlaneSettings(token_file=token_file).token_value == "from-file"  # the file wins
    monkeypatch.setenv("DFLASH_CONTROL_PLANE_TOKEN", "  ")
    assert ControlPlaneSettings().token_value is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        ControlPlaneSettings(token_file=tmp_path / "empty")
    with pytest.raises(ValidationError, match="cannot read it"):
        ControlPlaneSettings(token_file=tmp_path / "missing")
    # The token is a secret in the settings too: it never shows in their repr or dump.
    settings = ControlPlaneSettings(token_file=token_file)
    assert "from-file" not in repr(settings) and "from-file" not in settings.model_dump_json()
