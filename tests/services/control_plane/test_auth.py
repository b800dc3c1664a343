"""The bearer token: required on every route but /healthz and the dashboard when configured, never
leaked; without one, the browser guard. test_access.py checks every route with every kind of token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from services.control_plane.settings import ControlPlaneSettings
from tests.services.control_plane.harness import TOKEN

REPO = Path(__file__).resolve().parents[3]

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
        for path in READS:  # reading needs the token too
            assert anonymous.get(path.format(id=jid)).status_code == 401, path
        assert secured.job(jid)["state"] == "queued" and secured.metric_rows(jid) == []
    # With the token, each of them goes through.
    assert secured.client.post(f"/v1/jobs/{jid}/metrics", json=MUTATING[4][2]).status_code == 200
    assert secured.client.post(f"/v1/jobs/{jid}/cancel").json()["state"] == "cancelled"
    assert secured.client.post(f"/v1/jobs/{jid}/resume").json()["state"] == "queued"
    assert secured.client.get(f"/v1/jobs/{jid}/checkpoints/latest/archive").status_code == 404  # none yet
    assert secured.client.delete(f"/v1/jobs/{jid}").status_code == 204
    assert secured.client.get("/healthz").json()["auth"] is True


def test_without_a_token_every_route_is_open_to_clients_but_not_to_cross_site_pages(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        job = anonymous.post("/v1/jobs", json={"data_path": "prepared"})
        assert job.status_code == 201
        cancel = f"/v1/jobs/{job.json()['id']}/cancel"
        # What a page can send cross-site without a preflight: a form post, a text/plain fetch.
        for headers in (
            {},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "text/plain"},
        ):
            refused = anonymous.post(cancel, content=b"x=1", headers=headers)
            assert refused.status_code == 403 and "X-DFlash-Client" in refused.json()["detail"], headers
            assert anonymous.post("/v1/agents/any/goodbye", headers=headers).status_code == 403
        assert server.job(job.json()["id"])["state"] == "queued"  # nothing changed
        # Our clients send JSON or the header (a page could only after a preflight, never granted).
        assert anonymous.post(cancel, headers={"X-DFlash-Client": "curl"}).status_code == 200
        preflight = anonymous.options(cancel, headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-dflash-client",
        })  # fmt: skip
        assert "access-control-allow-origin" not in preflight.headers
    assert server.client.get("/healthz").json()["auth"] is False


def test_without_a_token_only_its_own_host_names_are_answered(server):
    """DNS rebinding: a page whose domain now resolves to 127.0.0.1 sends its own Host."""
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for host in ("evil.example", "evil.example:8600", "10.1.2.3"):
            refused = anonymous.get("/v1/jobs", headers={"Host": host})
            assert refused.status_code == 421 and "--allowed-hosts" in refused.json()["detail"], host
        port = server.url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert anonymous.get("/v1/jobs", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_a_token_open_other_names(start_server):
    listed = start_server(allowed_hosts="trainer-net.internal")
    assert httpx.get(listed.url + "/v1/jobs", headers={"Host": "trainer-net.internal:80"}).status_code == 200
    assert httpx.get(listed.url + "/v1/jobs", headers={"Host": "other.internal"}).status_code == 421
    tokened = start_server(token=TOKEN)  # the bearer token guards it: any name, any client
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(tokened.url + "/v1/jobs", headers={"Host": "cp.example", **bearer}).status_code == 200


def test_the_cli_refuses_an_open_port_beyond_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFLASH_")}
    command = [sys.executable, "-m", "services.cli.main", "control-plane", "--host", "0.0.0.0", "--port", "1",
               "--db", str(tmp_path / "cp.db")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "no token is set" in result.stdout


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
