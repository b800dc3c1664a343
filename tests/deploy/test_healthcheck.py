"""`dflash healthcheck`, the command of every compose healthcheck: 0 only for a healthy answer.

The healthy cases run against the real services in test_cpu_profile.py; here a real gRPC health
server on 127.0.0.1 flips between SERVING and NOT_SERVING, dead or wrong endpoints fail, and a
real control plane with agent tokens answers for its agents.
"""

from __future__ import annotations

import socket
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cli.main import main
from tests.services.control_plane.harness import (
    AGENT_TOKENS,
    TOKEN,
    ControlPlaneServer,
    settings_for,
    write_agent_tokens,
)


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_grpc_is_healthy_only_while_serving(health_server, capsys):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["healthcheck", "grpc", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["healthcheck", "grpc", address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out
    assert main(["healthcheck", "grpc", address, "--service", "dflash.v1.Nope"]) == 1
    assert main(["healthcheck", "grpc", f"127.0.0.1:{dead_port()}", "--timeout", "2"]) == 1


class _Status(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_wants_a_2xx(http_server):
    assert main(["healthcheck", "http", f"{http_server}/healthz"]) == 0
    assert main(["healthcheck", "http", f"{http_server}/broken"]) == 1
    assert main(["healthcheck", "http", f"http://127.0.0.1:{dead_port()}/healthz"]) == 1


def test_agent_wants_a_live_agent_of_that_name(tmp_path, capsys, monkeypatch):
    """Against a real control plane with agent tokens: the agent's own token reads its own record."""
    monkeypatch.delenv("DFLASH_CONTROL_PLANE_TOKEN", raising=False)
    monkeypatch.delenv("DFLASH_AGENT_TOKEN_FILE", raising=False)
    tokens = write_agent_tokens(tmp_path / "agent_tokens")
    server = ControlPlaneServer(
        settings_for(tmp_path, executor="agent", token=TOKEN, agent_token_file=tokens), token=TOKEN
    )
    try:
        token_file = tmp_path / "agent-a.token"
        token_file.write_text(AGENT_TOKENS["agent-a"] + "\n")
        check = ["healthcheck", "agent", "--control-plane", server.url, "--name", "agent-a"]
        assert main([*check, "--token-file", str(token_file)]) == 1
        assert "'agent-a' is not registered" in capsys.readouterr().out
        assert server.client.post("/v1/agents", json={"name": "agent-a"}).status_code == 201
        assert main([*check, "--token-file", str(token_file)]) == 0
        monkeypatch.setenv("DFLASH_AGENT_TOKEN_FILE", str(token_file))  # the agent's own variable
        assert main(check) == 0
        other = ["healthcheck", "agent", "--control-plane", server.url, "--name", "agent-b"]
        assert main(other) == 1 and "HTTP 403" in capsys.readouterr().out  # not its record to read
        monkeypatch.delenv("DFLASH_AGENT_TOKEN_FILE")
        assert main(check) == 1 and "HTTP 401" in capsys.readouterr().out
        assert server.client.post("/v1/agents/agent-a/goodbye").status_code == 204
        assert main([*check, "--token-file", str(token_file)]) == 1
        assert "'agent-a' is gone" in capsys.readouterr().out
    finally:
        server.stop()
    monkeypatch.delenv("DFLASH_AGENT_CONTROL_PLANE", raising=False)
    assert main(["healthcheck", "agent", "--name", "trainer"]) == 1
    assert "DFLASH_AGENT_CONTROL_PLANE" in capsys.readouterr().out
