"""A client's set of hidden-state endpoints against a real service on 127.0.0.1.

What must hold: with a grace period one answering endpoint is enough and the silent one is left
for `admit`; without one every endpoint must answer, and the error names the silent one; a set
whose endpoints serve different verifiers is refused naming both; a late endpoint is admitted
only when it serves the set's verifier and every layer asked for.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.hidden_states.service_set import HiddenStateServiceError, ServiceSet
from tests.factories.services import running_service
from tests.factories.verifiers import make_tiny_verifier

LAYERS = [1, 2]  # the service also serves N = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = make_tiny_verifier(Path(tmp_path_factory.mktemp("v")) / "tiny", num_layers=4, hidden_size=128)
    with running_service(tiny.path, target_layer_ids=LAYERS) as running:
        yield running


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_one_answer_is_enough_with_a_grace_period(server):
    dead = _dead_address()
    with ServiceSet([server.address, dead]) as services:
        info = services.connect(timeout_s=10.0, others_grace_s=0.5)
        assert list(info.layer_ids) == [1, 2, 4]
        assert list(services.infos) == [server.address]
        assert services.endpoints[1].info is None  # left for `admit`


def test_without_a_grace_period_every_endpoint_must_answer(server):
    dead = _dead_address()
    expected = f"{dead} did not answer GetInfo within 1.5 s"
    with (
        ServiceSet([server.address, dead]) as services,
        pytest.raises(HiddenStateServiceError, match=expected),
    ):
        services.connect(timeout_s=1.5)


def test_endpoints_serving_different_verifiers_are_refused(server):
    with ServiceSet([server.address, server.address]) as services:
        other = services.endpoints[1]
        services.connect(timeout_s=10.0)
        other.info.hidden_size = 256  # as if the second endpoint ran another verifier
        services.endpoints[0].info = None
        with pytest.raises(HiddenStateServiceError, match=r"(?s)different verifiers.*hidden size"):
            services.connect(timeout_s=10.0)


def test_a_late_endpoint_is_admitted_only_with_every_layer(server):
    with ServiceSet([server.address, server.address]) as services:
        services.connect(timeout_s=10.0)
        late = services.endpoints[1]
        late.info = None
        with pytest.raises(HiddenStateServiceError, match=r"layer ids \[3\] are not served"):
            services.admit(late, layer_ids=[1, 3])
        assert late.info is None
        services.admit(late, layer_ids=[1, 2, 4])
        assert late.info is not None
