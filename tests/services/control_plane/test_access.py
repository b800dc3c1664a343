"""Who reaches which route when the control plane has tokens, for EVERY route of the app.

The routes are enumerated from the app itself (`app.routes`, included routers opened), so a route
added later is checked too: unless this file lists it as open or in a scoped token's reach, it
must refuse a request without a token (401), with a wrong token (403) and with an agent's or a
trainer's token (403). The lists below are written out here, apart from services/control_plane/
access.py, so a change to either shows up as a failure.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from services.control_plane.credentials import Principal, Role
from services.control_plane.settings import ControlPlaneSettings
from tests.services.control_plane.harness import AGENT_TOKENS, TOKEN, settings_for, write_agent_tokens

OPEN = {
    ("GET", "/healthz"),
    ("GET", "/"),
    ("GET", "/new"),
    ("GET", "/jobs/{job_id}"),
    ("GET", "/services"),
    ("GET", "/dashboard/{name}"),
}
AGENT = {  # what an agent's token reaches (for its own name)
    ("POST", "/v1/agents"),
    ("GET", "/v1/agents/{agent_id}"),
    ("POST", "/v1/agents/{agent_id}/heartbeat"),
    ("POST", "/v1/agents/{agent_id}/claim"),
    ("POST", "/v1/agents/{agent_id}/jobs/{job_id}/log"),
    ("POST", "/v1/agents/{agent_id}/goodbye"),
}
TRAINER = {("POST", "/v1/jobs/{job_id}/metrics")}  # what a trainer's token reaches (for its own job)
BODIES = {
    ("POST", "/v1/agents"): {"name": "agent-a"},
    ("POST", "/v1/jobs/{job_id}/metrics"): {
        "rows": [{"step": 1, "time": 1.0, "metrics": {"train/loss": 1.0}}]
    },
}
BOUND_AGENT = AGENT_TOKENS["agent-a"]
ANY_AGENT = AGENT_TOKENS[None]


def app_routes(app) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route the app serves (HEAD aside: it is GET's)."""
    try:
        from fastapi.routing import iter_route_contexts  # newer FastAPI: included routers as one entry
    except ImportError:
        routes = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    for route in routes:
        for method in sorted(set(route.methods) - {"HEAD"}):
            yield method, route.path


@pytest.fixture
def secured(start_server, tmp_path):
    agent_tokens = write_agent_tokens(tmp_path / "agent_tokens")
    return start_server(executor="agent", max_concurrent_jobs=4, token=TOKEN, agent_token_file=agent_tokens)


def trainer_token(server, job_id: str, attempt: int = 1) -> str:
    token = server.settings.credentials().trainer_token(job_id, attempt)
    assert token is not None
    return token


def call(server, method: str, template: str, *, token: str | None, **values: str) -> int:
    """The status of one request to the route (a live stream is closed once its status is in)."""
    url = template.format(**{"job_id": "none", "agent_id": "agent-a", "name": "latest", **values})
    headers = {"X-DFlash-Client": "tests", **({"Authorization": token} if token is not None else {})}
    body = BODIES.get((method, template), {}) if method in ("POST", "PUT", "PATCH") else None
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream(method, url, json=body, headers=headers) as response,
    ):
        if response.status_code == 401:
            assert response.headers["www-authenticate"] == "Bearer"
        return response.status_code


def check_route(server, method: str, path: str, *, job: str, other: str) -> None:
    """Every kind of token against one route, for `job` (`other`: a job the tokens are not for)."""
    route = (method, path)

    def status(token: str | None, **values: str) -> int:
        return call(server, method, path, token=token, job_id=job, **values)

    if route in OPEN:
        for token in (None, "Bearer wrong", f"Bearer {BOUND_AGENT}"):
            assert status(token) not in (401, 403), (route, token)
        return
    assert status(None) == 401, route
    assert status(f"Basic {TOKEN}") == 401, route
    assert status("Bearer") == 401, route
    assert status("Bearer wrong-token") == 403, route
    assert status(f"Bearer {TOKEN}x") == 403, route
    if method == "GET":
        assert status(f"Bearer {TOKEN}") not in (401, 403), route
    # An agent's token: its own routes under its own name only.
    if route in AGENT:
        assert status(f"Bearer {BOUND_AGENT}") not in (401, 403), route
        if "{agent_id}" in path:
            assert status(f"Bearer {BOUND_AGENT}", agent_id="agent-b") == 403, route
            assert status(f"Bearer {ANY_AGENT}", agent_id="agent-b") not in (401, 403), route
    else:
        assert status(f"Bearer {BOUND_AGENT}") == 403, route
        assert status(f"Bearer {ANY_AGENT}") == 403, route
    # A trainer's token: its own job's metric posts only.
    if route in TRAINER:
        assert status(f"Bearer {trainer_token(server, job)}") not in (401, 403), route
        assert status(f"Bearer {trainer_token(server, other)}") == 403, route
    else:
        assert status(f"Bearer {trainer_token(server, job)}") == 403, route


def test_every_route_refuses_a_missing_wrong_or_out_of_scope_token(secured):
    job = secured.submit({"data_path": "prepared", "gpus": 0})["id"]
    other = secured.submit({"data_path": "prepared", "gpus": 0})["id"]
    routes = sorted(set(app_routes(secured.app)))
    documented = {path for path in secured.client.get("/openapi.json").json()["paths"]}
    assert documented <= {path for _, path in routes}, "the enumeration misses routes the API documents"
    assert {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics")} <= set(routes)
    assert set(routes) >= OPEN | AGENT | TRAINER, "a route this test names is gone: update the lists"

    for method, path in routes:
        check_route(secured, method, path, job=job, other=other)
    assert secured.job(other)["state"] == "queued"  # nothing a refused request asked for happened


def test_the_token_is_checked_before_the_body_is_read(secured):
    refusals = []
    for token in (None, "Bearer wrong-token", f"Bearer {BOUND_AGENT}"):
        headers = {"Authorization": token} if token else {}
        # Malformed JSON: 401/403, not 422.
        refusals.append(secured.client.post("/v1/jobs", content=b'{"data_path": ', headers={
            **headers, "Content-Type": "application/json", "Authorization": token or "",
        }).status_code)  # fmt: skip
        # A body past the size limit: 401/403, not 413.
        refusals.append(secured.client.post("/v1/jobs", content=b"x" * (2 << 20), headers={
            **headers, "Content-Type": "application/json", "Authorization": token or "",
        }).status_code)  # fmt: skip
    assert refusals == [401, 401, 403, 403, 403, 403]

    # A body announced but never sent: the refusal comes without waiting for a byte of it.
    host, port = secured.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n".encode()
        )
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 401"), answer
    assert secured.client.get("/v1/jobs").json()["count"] == 0


def test_an_agent_token_speaks_for_its_own_agent_only(secured):
    bound = {"Authorization": f"Bearer {BOUND_AGENT}"}
    anyone = {"Authorization": f"Bearer {ANY_AGENT}"}
    impostor = secured.client.post("/v1/agents", json={"name": "agent-b"}, headers=bound)
    assert impostor.status_code == 403 and "belongs to agent 'agent-a'" in impostor.json()["detail"]
    assert (
        secured.client.post("/v1/agents", json={"name": "agent-a", "gpus": [0]}, headers=bound).status_code
        == 201
    )
    assert (
        secured.client.post("/v1/agents", json={"name": "agent-b", "gpus": [0]}, headers=anyone).status_code
        == 201
    )
    job = secured.submit({"data_path": "prepared", "gpus": 1})["id"]
    # agent-a may not claim, heartbeat or say goodbye as agent-b.
    for route in ("claim", "heartbeat", "goodbye"):
        assert secured.client.post(f"/v1/agents/agent-b/{route}", json={}, headers=bound).status_code == 403
    assert secured.job(job)["state"] == "queued"
    assert [a["state"] for a in secured.client.get("/v1/agents").json()] == ["live", "live"]

    # agent-b claims the job; agent-a cannot ship its log or report it ended.
    claimed = secured.client.post("/v1/agents/agent-b/claim", headers=anyone)
    assert claimed.status_code == 200 and claimed.json()["id"] == job
    log = secured.client.post(f"/v1/agents/agent-a/jobs/{job}/log", content=b"forged\n", headers={
        **bound, "Content-Type": "application/octet-stream",
    })  # fmt: skip
    assert log.status_code == 409 and "not run by agent agent-a" in log.json()["detail"]
    forged_exit = {"running": {}, "exits": [{"job_id": job, "exit_code": 1}]}
    assert (
        secured.client.post("/v1/agents/agent-a/heartbeat", json=forged_exit, headers=bound).status_code
        == 200
    )
    assert secured.job(job)["state"] == "starting"  # not agent-a's to end
    assert "forged" not in secured.client.get(f"/v1/jobs/{job}/logs").text


def test_a_trainer_token_is_for_its_own_attempt(start_server):
    server = start_server(max_concurrent_jobs=0, token=TOKEN)
    job = server.submit({"data_path": "prepared"})["id"]
    rows = BODIES[("POST", "/v1/jobs/{job_id}/metrics")]
    first = {"Authorization": f"Bearer {trainer_token(server, job, attempt=1)}"}
    assert server.client.post(f"/v1/jobs/{job}/metrics", json=rows, headers=first).status_code == 200
    server.client.post(f"/v1/jobs/{job}/cancel").raise_for_status()
    assert server.client.post(f"/v1/jobs/{job}/resume").json()["attempt"] == 2
    stale = server.client.post(f"/v1/jobs/{job}/metrics", json=rows, headers=first)
    assert stale.status_code == 403 and "attempt 1" in stale.json()["detail"]
    second = {"Authorization": f"Bearer {trainer_token(server, job, attempt=2)}"}
    assert server.client.post(f"/v1/jobs/{job}/metrics", json=rows, headers=second).status_code == 200
    # A token forged for another job, or with its MAC cut, is nobody's.
    forged = trainer_token(server, job, attempt=2).replace(job, "20260101-000000-abcdef")
    for token in (forged, trainer_token(server, job, attempt=2)[:-1]):
        headers = {"Authorization": f"Bearer {token}"}
        assert server.client.post(f"/v1/jobs/{job}/metrics", json=rows, headers=headers).status_code == 403


def test_agent_token_file_errors_name_the_fix(tmp_path):
    def settings(text: str, **overrides):
        (tmp_path / "agents").write_text(text)
        values = {"token": TOKEN, "agent_token_file": tmp_path / "agents", **overrides}
        return settings_for(tmp_path, **values)

    credentials = settings("# comments and blank lines are fine\n\nnode-1 t1  # trailing\nt2\n").credentials()
    assert credentials.identify("Bearer t1") == Principal(Role.AGENT, agent="node-1")
    assert credentials.identify("Bearer t2") == Principal(Role.AGENT, agent=None)
    for text, message in [
        ("", "lists no token"),
        ("a b c\n", "line 1: expected `TOKEN` or `AGENT_NAME TOKEN`"),
        ("bad/name t1\n", "agent name 'bad/name'"),
        ("t1\nx t1\n", "line 2: this token is listed twice"),
        (f"{TOKEN}\n", "lists the admin token"),
        ("dflash-trainer:x:1:y\n", "may not start with"),
    ]:
        with pytest.raises(ValidationError, match=message):
            settings(text)
    with pytest.raises(ValidationError, match="needs an admin token as well"):
        settings("t1\n", token=None)
    with pytest.raises(ValidationError, match="cannot read it"):
        ControlPlaneSettings(token=TOKEN, agent_token_file=tmp_path / "missing")
