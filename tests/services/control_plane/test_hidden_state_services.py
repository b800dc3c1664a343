"""GET /v1/hidden-state-services: the services jobs read from, checked over gRPC health."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from services.control_plane.hidden_state_services import HIDDEN_STATES_SERVICE
from tests.factories.services import running_service
from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import free_port, settings_for


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
