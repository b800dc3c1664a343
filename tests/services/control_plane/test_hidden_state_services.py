"""GET /v1/hidden-state-services: the services jobs read from, checked over gRPC health, by
probes that are bounded in number and never hold the server's worker threads."""

from __future__ import annotations

import contextlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from services.control_plane.hidden_state_services import HIDDEN_STATES_SERVICE
from tests.factories.services import running_service
from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import free_port, settings_for, wait_for


def test_services_are_listed_with_their_health_info_and_jobs(start_server, workspace):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with running_service(workspace["verifier"], target_layer_ids=[1, 2]) as service:
        server = start_server(
            data_root=workspace["root"], max_concurrent_jobs=0, hidden_states_endpoints=f"{dead}"
        )
        # A queued job names the live service (as the tutorial writes it: an http URL).
        job = server.submit(tiny_job(workspace, hidden_states_endpoint=[f"http://{service.address}/v1"]))
        # A job naming an endpoint that is no host:port does not break the listing.
        odd = server.submit(tiny_job(workspace, hidden_states_endpoint=["no-port-here"]))
        listed = {s["endpoint"]: s for s in server.client.get("/v1/hidden-state-services").json()}
        assert set(listed) == {dead, service.address, "no-port-here"}
        bad = listed["no-port-here"]
        assert bad["status"] == "error" and "must name a host and a port" in bad["detail"]
        assert bad["jobs"] == [odd["id"]]

        live = listed[service.address]
        assert live["status"] == "serving" and live["detail"] is None
        assert live["jobs"] == [job["id"]] and not live["configured"]
        info = live["info"]
        assert info["verifier"] == str(workspace["verifier"]) and info["backend"] == "transformers"
        assert info["layer_ids"] == [1, 2, info["num_layers"]] and info["dtype"] == "float32"

        down = listed[dead]
        assert down["status"] == "unreachable" and down["configured"] and down["jobs"] == []
        assert down["info"] is None and "no gRPC connection" in down["detail"]

        # A service that says it is not serving (draining) is shown so, with its own words.
        service._health.set(HIDDEN_STATES_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.app.state.control_plane.hidden_state_services.cache_s = 0.0
        again = {s["endpoint"]: s for s in server.client.get("/v1/hidden-state-services").json()}
        assert again[service.address]["status"] == "not_serving"
        assert again[service.address]["detail"] == "health NOT_SERVING"


def test_a_bad_endpoint_setting_is_refused_with_its_name(tmp_path):
    with pytest.raises(ValidationError, match="no-port"):
        settings_for(tmp_path, hidden_states_endpoints="127.0.0.1:8000,no-port")


class SilentPort:
    """A TCP port that accepts connections and never answers: a gRPC probe of it waits for its
    whole deadline. Counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.connections.append(self.sock.accept()[0])

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.sock.close()


def test_probes_never_hold_the_threads_agent_heartbeats_need(start_server, workspace):
    silent = SilentPort()
    try:
        server = start_server(
            data_root=workspace["root"], executor="agent", hidden_states_endpoints=silent.address
        )
        server.app.state.control_plane.hidden_state_services.timeout_s = 20.0  # a long, dead wait
        assert server.client.post("/v1/agents", json={"name": "a"}).status_code == 201
        # More listings at once than the server has worker threads (40): if each held one while
        # its probe waits, the heartbeat below would queue behind them.
        with ThreadPoolExecutor(max_workers=60) as pool:
            listings = [pool.submit(server.client.get, "/v1/hidden-state-services") for _ in range(60)]
            wait_for(lambda: silent.connections, what="a probe to dial the silent port", timeout_s=60)
            assert server.client.post("/v1/agents/a/heartbeat", json={}).status_code == 200
            assert not any(listing.done() for listing in listings), "a listing ended before the heartbeat"
            answers = [listing.result() for listing in listings]
        assert {answer.json()[0]["status"] for answer in answers} == {"unreachable"}
        # One probe per endpoint at a time, however many ask: every answer is that probe's.
        assert len({answer.json()[0]["checked_at"] for answer in answers}) == 1
    finally:
        silent.close()


def test_only_a_bounded_number_of_job_named_services_is_probed(start_server, workspace):
    silent = [SilentPort() for _ in range(4)]
    try:
        server = start_server(data_root=workspace["root"], max_concurrent_jobs=0, max_probed_job_endpoints=2)
        server.app.state.control_plane.hidden_state_services.timeout_s = 0.5
        for port in silent:
            server.submit(tiny_job(workspace, hidden_states_endpoint=[port.address]))
        listed = {s["endpoint"]: s for s in server.client.get("/v1/hidden-state-services").json()}
        assert set(listed) == {port.address for port in silent}
        checked = [s for s in listed.values() if s["status"] == "unreachable"]
        unchecked = [s for s in listed.values() if s["detail"] and "not checked" in s["detail"]]
        assert len(checked) == 2 and len(unchecked) == 2
        assert all("--max-probed-job-endpoints" in s["detail"] and s["status"] == "error" for s in unchecked)
        assert sum(1 for port in silent if port.connections) == 2  # the others were never dialled
    finally:
        for port in silent:
            port.close()


def test_registered_services_are_listed_by_name_and_jobs_name_them(start_server, workspace, tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (registry / "gone.endpoint").write_text(f"{dead}\n# slurm job 7 on gpu-01\n")
    (registry / "garbled.endpoint").write_text("not an address\n")
    (registry / "half.endpoint.tmp.123").write_text("127.0.0.1:1\n")  # a script mid-write: not yet one
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=0, hidden_states_registry=registry)
    server.app.state.control_plane.hidden_state_services.timeout_s = 0.5
    listed = {s["registered_as"]: s for s in server.client.get("/v1/hidden-state-services").json()}
    assert set(listed) == {"gone", "garbled"}
    assert listed["gone"]["endpoint"] == dead and listed["gone"]["status"] == "unreachable"
    assert not listed["gone"]["configured"]
    assert (
        listed["garbled"]["status"] == "error"
        and "must name a host and a port" in listed["garbled"]["detail"]
    )

    job = server.submit(tiny_job(workspace, hidden_states_endpoint=["registry:gone", "127.0.0.1:9"]))
    assert job["config"]["hidden_states_endpoint"] == [dead, "127.0.0.1:9"]
    for name, complaint in (
        ("nope", "registered: garbled, gone"),
        ("garbled", "must name a host and a port"),
    ):
        refused = server.client.post(
            "/v1/jobs", json=tiny_job(workspace, hidden_states_endpoint=[f"registry:{name}"])
        )
        assert refused.status_code == 422 and complaint in refused.text, refused.text


def test_a_registered_name_needs_a_registry(start_server, workspace):
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=0)
    refused = server.client.post("/v1/jobs", json=tiny_job(workspace, hidden_states_endpoint=["registry:q"]))
    assert refused.status_code == 422 and "--hidden-states-registry" in refused.text
