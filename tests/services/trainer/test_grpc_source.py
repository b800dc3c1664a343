"""The trainer's gRPC hidden-state source against real services on 127.0.0.1.

What must hold: the tensors equal an in-process forward; prefetching is bounded by bytes; two
endpoints share the load and one dying loses nothing; a service killed mid-stream and restarted
delivers every sample exactly once; a service that serves other layers or another verifier is
refused before anything runs, naming both sides. The payload side channel (on by default):
its samples equal in-band ones byte for byte; an unreachable payload port means in-band with one
warning; a connection dropped mid-stream, like a service killed and restarted on another payload
port, loses nothing and is bound again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from dflash_core.verifier import load_verifier
from services.trainer.endpoint_health import Backoff, CircuitBreaker
from services.trainer.grpc_source import GrpcSource, HiddenStateServiceError
from services.trainer.sources import InProcessSource, SampleRequest
from tests.factories.services import running_service, start_service_process
from tests.factories.verifiers import make_tiny_verifier

LAYERS = [1, 2]  # the trainer's --target-layer-ids; the service also serves N = 4
VOCAB = 400


@pytest.fixture(scope="module")
def verifier_path(tmp_path_factory) -> Path:
    tiny = make_tiny_verifier(tmp_path_factory.mktemp("v") / "tiny", num_layers=4, hidden_size=128)
    return tiny.path


@pytest.fixture(scope="module")
def reference(verifier_path):
    """The same verifier run in-process: what every delivered tensor must equal."""
    model, _ = load_verifier(str(verifier_path))
    return model


def make_requests(count: int, *, seed: int = 0, first_id: int = 0) -> list[SampleRequest]:
    generator = torch.Generator().manual_seed(seed)
    return [
        SampleRequest(
            sample_id=first_id + i,
            input_ids=torch.randint(0, VOCAB, (8 + (i * 7) % 50,), generator=generator),
        )
        for i in range(count)
    ]


def assert_matches_reference(results, requests, model, fingerprint) -> None:
    expected = InProcessSource(model=model, fingerprint=fingerprint, target_layer_ids=LAYERS).extract(
        requests
    )
    assert [r.sample_id for r in results] == [r.sample_id for r in requests]
    for got, want in zip(results, expected, strict=True):
        # float32 on both sides; the service batches with padding, the reference too: same kernels.
        torch.testing.assert_close(got.aux, want.aux, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.last, want.last, rtol=0, atol=1e-5)


def test_delivers_the_verifiers_hidden_states_in_request_order(verifier_path, reference):
    with running_service(verifier_path, target_layer_ids=LAYERS) as server:
        source = GrpcSource(
            [f"http://{server.address}/v1"],  # the tutorial's URL form is accepted
            target_layer_ids=LAYERS,
            expected=server.backend.info.fingerprint,
        )
        try:
            requests = make_requests(24)
            source.prefetch(requests[12:])
            results = source.extract(requests[:12]) + source.extract(requests[12:])
        finally:
            source.close()
        assert_matches_reference(results, requests, reference, server.backend.info.fingerprint)


def test_prefetch_is_bounded_by_bytes_in_flight(verifier_path):
    requests = make_requests(40)
    bytes_per_token = (len(LAYERS) + 1) * 128 * 4  # float32 service
    budget = 3 * 60 * bytes_per_token  # room for about three of the longest samples
    with running_service(verifier_path, target_layer_ids=LAYERS) as server:
        source = GrpcSource([server.address], target_layer_ids=LAYERS, inflight_bytes=budget)
        try:
            source.prefetch(requests)
            time.sleep(1.5)
            served_before_consuming = server.scheduler.samples_served
            results = source.extract(requests)
        finally:
            source.close()
    # Nothing is consumed while sleeping, so the service computed only what fits the budget.
    assert 1 <= served_before_consuming <= 6, served_before_consuming
    assert len(results) == 40


def test_refuses_a_service_without_the_trainers_layers(verifier_path):
    expected = r"does not serve \[2\]; it serves \[1, 4\]"
    with (
        running_service(verifier_path, target_layer_ids=[1]) as server,
        pytest.raises(HiddenStateServiceError, match=expected),
    ):
        GrpcSource([server.address], target_layer_ids=LAYERS)


def test_refuses_a_service_running_another_verifier(verifier_path):
    with running_service(verifier_path, target_layer_ids=LAYERS) as server:
        other = server.backend.info.fingerprint.model_copy(update={"hidden_size": 256})
        with pytest.raises(
            HiddenStateServiceError, match=r"hidden size: 256 \(trainer .*\) vs 128 \(service"
        ):
            GrpcSource([server.address], target_layer_ids=LAYERS, expected=other)


def test_no_service_is_a_clear_error_not_a_hang():
    started = time.monotonic()
    with pytest.raises(HiddenStateServiceError, match=r"127\.0\.0\.1:1: UNAVAILABLE"):
        GrpcSource(["127.0.0.1:1"], target_layer_ids=LAYERS, connect_timeout_s=2.0)
    assert time.monotonic() - started < 30


def test_a_rejected_sample_names_itself(verifier_path):
    with running_service(verifier_path, target_layer_ids=LAYERS) as server:
        source = GrpcSource([server.address], target_layer_ids=LAYERS)
        try:
            bad = SampleRequest(sample_id=7, input_ids=torch.tensor([1, 2, VOCAB + 5]))
            with pytest.raises(HiddenStateServiceError, match=r"sample 7: token id 405 .*INVALID_ARGUMENT"):
                source.extract([bad])
            # The source keeps working for good samples afterwards.
            assert len(source.extract(make_requests(3, first_id=100))) == 3
        finally:
            source.close()


def test_a_service_killed_mid_stream_and_restarted_loses_nothing(verifier_path, reference):
    services = [start_service_process(verifier_path, LAYERS)]
    source = None
    try:
        source = GrpcSource(
            [services[0].address], target_layer_ids=LAYERS, inflight_bytes=1 << 20, timeout_s=120
        )
        requests = make_requests(60, seed=1)
        endpoint = source._endpoints[0]
        wait_until(lambda: endpoint.payload_connections == 2)  # both streams on the side channel
        source.prefetch(requests)
        first = source.extract(requests[:10])
        services[0].kill()  # SIGKILL with requests in flight: no goodbye on the wire
        port = services[0].port
        restart = threading.Timer(
            2.0, lambda: services.append(start_service_process(verifier_path, LAYERS, port=port))
        )
        restart.start()
        rest = source.extract(requests[10:])
        restart.join()
        fingerprint = source.fingerprint
        connections = endpoint.payload_connections
    finally:
        if source is not None:
            source.close()
        for service in services:
            service.stop()
    assert_matches_reference(first + rest, requests, reference, fingerprint)
    # The restarted service has another payload port: the side channel was negotiated again.
    assert connections >= 3


def test_two_endpoints_share_the_load_and_survive_one_dying(verifier_path, reference):
    first, second = start_service_process(verifier_path, LAYERS), start_service_process(verifier_path, LAYERS)
    source = None
    try:
        source = GrpcSource(
            [first.address, second.address], target_layer_ids=LAYERS, inflight_bytes=1 << 20, timeout_s=120
        )
        requests = make_requests(80, seed=2)
        head = source.extract(requests[:40])
        delivered = {e.address: e.delivered for e in source._endpoints}
        second.kill()
        tail = source.extract(requests[40:])
        fingerprint = source.fingerprint
    finally:
        if source is not None:
            source.close()
        first.stop()
        second.stop()
    assert all(count > 0 for count in delivered.values()), delivered
    assert_matches_reference(head + tail, requests, reference, fingerprint)


# ---------------------------------------------------------------------------- payload side channel


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_side_channel_samples_equal_in_band_samples_byte_for_byte(verifier_path):
    requests = make_requests(30, seed=3)
    results, counts = {}, {}
    # One sample per forward, so batch composition (which changes float rounding) cannot differ
    # between the two runs: only the transport does.
    with running_service(verifier_path, target_layer_ids=LAYERS, max_batch_tokens=1) as server:
        for transport in ("auto", "grpc"):
            source = GrpcSource(
                [server.address], target_layer_ids=LAYERS, streams_per_endpoint=2, payload_transport=transport
            )
            try:
                if transport == "auto":  # both streams bound before anything is asked for
                    wait_until(lambda: server.payload_listener.bound == 2)
                results[transport] = source.extract(requests)
                endpoint = source._endpoints[0]
                counts[transport] = (endpoint.delivered, endpoint.delivered_on_payload_channel)
            finally:
                source.close()
    assert counts == {"auto": (30, 30), "grpc": (30, 0)}
    for side, framed in zip(results["auto"], results["grpc"], strict=True):
        assert side.sample_id == framed.sample_id
        for name in ("aux", "last"):
            a, b = getattr(side, name), getattr(framed, name)
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_an_unreachable_payload_port_falls_back_to_in_band_with_one_warning(verifier_path, reference, caplog):
    with running_service(verifier_path, target_layer_ids=LAYERS) as server:
        port = server.payload_port
        server.payload_listener.stop()  # GetInfo still advertises the port; nobody listens on it
        source = GrpcSource([server.address], target_layer_ids=LAYERS, streams_per_endpoint=2)
        try:
            assert source.service_info.payload_port == port
            with caplog.at_level(logging.WARNING, logger="services.trainer.grpc_source"):
                requests = make_requests(20, seed=4)
                results = source.extract(requests)
            endpoint = source._endpoints[0]
            assert (endpoint.delivered, endpoint.delivered_on_payload_channel) == (20, 0)
            assert endpoint.payload_connections == 0
            fingerprint = source.fingerprint
        finally:
            source.close()
    assert_matches_reference(results, requests, reference, fingerprint)
    warnings = [r.getMessage() for r in caplog.records if "payload side channel" in r.getMessage()]
    assert len(warnings) == 1, warnings  # two streams, one reason: one warning
    assert server.address in warnings[0] and f"127.0.0.1:{port}" in warnings[0]
    assert "refused" in warnings[0].lower()


def test_a_payload_connection_dropped_mid_stream_loses_nothing(verifier_path, reference):
    with running_service(verifier_path, target_layer_ids=LAYERS) as server:
        source = GrpcSource(
            [server.address], target_layer_ids=LAYERS, inflight_bytes=1 << 20, streams_per_endpoint=1
        )
        try:
            wait_until(lambda: server.payload_listener.bound == 1)
            requests = make_requests(60, seed=5)
            source.prefetch(requests)
            first = source.extract(requests[:10])
            assert server.payload_listener.drop_connections() == 1  # samples in flight on it
            rest = source.extract(requests[10:])
            endpoint = source._endpoints[0]
            on_side_channel, connections = endpoint.delivered_on_payload_channel, endpoint.payload_connections
            fingerprint = source.fingerprint
        finally:
            source.close()
    assert_matches_reference(first + rest, requests, reference, fingerprint)
    assert connections >= 2  # the stream reconnected and bound a new connection
    assert on_side_channel >= 10


def test_payload_transport_must_be_auto_or_grpc():
    with pytest.raises(ValueError, match="payload_transport must be 'auto' or 'grpc'"):
        GrpcSource(["127.0.0.1:1"], target_layer_ids=LAYERS, payload_transport="tcp")  # type: ignore[arg-type]


def test_circuit_breaker_opens_after_repeated_failures_and_half_opens_after_cooldown():
    breaker = CircuitBreaker(threshold=3, cooldown_s=0.3, backoff=Backoff(initial_s=0.01, maximum_s=0.02))
    for _ in range(2):
        breaker.record_failure("UNAVAILABLE")
    assert not breaker.is_open and 0 < breaker.wait_before_attempt() <= 0.025
    breaker.record_failure("UNAVAILABLE")
    assert breaker.is_open and breaker.wait_before_attempt() > 0.2
    time.sleep(0.35)
    assert breaker.wait_before_attempt() == 0.0  # half-open: one trial
    breaker.record_failure("still down")
    assert breaker.is_open  # the trial failed: open again for another cooldown
    time.sleep(0.35)
    breaker.wait_before_attempt()
    breaker.record_success()
    assert not breaker.is_open and breaker.wait_before_attempt() == 0.0
