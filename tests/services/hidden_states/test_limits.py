"""What one call may ask of the hidden-state service, checked before anything big is built.

A real service on 127.0.0.1 (transformers backend, the tiny verifier). Requests carry token ids
only, so the largest valid request is known from --max-length and the Generate caps: a bigger
message is refused by gRPC unparsed (RESOURCE_EXHAUSTED), and the service keeps serving. Generate
calls over --max-generate-prompts or --max-generate-tokens are refused by name, and the client
reads both caps from GetInfo and cuts its calls to fit. The hidden states all streams hold stay
under --max-pending-bytes, and a client that stops reading is cancelled after --stall-timeout-s
instead of holding them (and the other clients) for good.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel
from services.hidden_states.generate_client import GenerateClient
from services.hidden_states.server import HiddenStateServer
from services.hidden_states.servicer import GenerateLimits
from tests.factories.services import running_service

LAYERS = [1, 2]
MAX_LENGTH = 64
LIMITS = GenerateLimits(max_prompts=4, max_tokens=200)
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server(verifier_path) -> Iterator[HiddenStateServer]:
    with running_service(
        verifier_path, target_layer_ids=LAYERS, max_length=MAX_LENGTH, generate_limits=LIMITS
    ) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.HiddenStatesStub]:
    with open_channel(server.address) as channel:
        yield pb_grpc.HiddenStatesStub(channel)


def extract(stub, request: pb.ExtractRequest) -> list[pb.ExtractResponse]:
    return list(stub.Extract(iter([request]), timeout=TIMEOUT_S))


def generate(stub, prompts: list[list[int]], max_new_tokens: int) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=p) for p in prompts],
        params=pb.SamplingParams(max_new_tokens=max_new_tokens),
    )
    return stub.Generate(request, timeout=TIMEOUT_S)


def test_a_message_bigger_than_any_valid_request_is_refused_unparsed(stub):
    huge = pb.ExtractRequest(sample_id=1, token_ids=[300] * 20_000, layer_ids=LAYERS)  # ~40 KB
    with pytest.raises(grpc.RpcError) as raised:
        extract(stub, huge)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The service serves on, and a request just over --max-length is answered per sample.
    (response,) = extract(
        stub, pb.ExtractRequest(sample_id=2, token_ids=[5] * (MAX_LENGTH + 1), layer_ids=LAYERS)
    )
    assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "longer than this service's max length 64" in response.error.message


def test_the_default_limits_refuse_an_8_mb_request_unparsed(verifier_path):
    with (
        running_service(verifier_path, target_layer_ids=LAYERS) as default,
        open_channel(default.address) as ch,
    ):
        stub = pb_grpc.HiddenStatesStub(ch)
        request = pb.ExtractRequest(sample_id=1, token_ids=[1000] * (4 << 20), layer_ids=LAYERS)  # 8 MiB
        with pytest.raises(grpc.RpcError) as raised:
            extract(stub, request)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_more_layer_ids_than_served_is_a_sample_error(stub):
    (response,) = extract(stub, pb.ExtractRequest(sample_id=3, token_ids=[5, 6], layer_ids=[1] * 1000))
    assert "1000 layer ids asked for; this service serves [1, 2, 4]" in response.error.message


def test_generate_calls_over_the_caps_are_refused_by_name(stub):
    with pytest.raises(grpc.RpcError) as raised:
        generate(stub, [[5, 6]] * 5, max_new_tokens=2)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "5 prompts in one call; this service takes at most 4 (--max-generate-prompts)"
        in raised.value.details()
    )
    with pytest.raises(grpc.RpcError) as raised:
        generate(stub, [[5] * 40] * 4, max_new_tokens=20)  # 4 x (40 + 20) = 240 tokens
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "240 tokens" in raised.value.details() and "--max-generate-tokens" in raised.value.details()
    assert len(generate(stub, [[5] * 30] * 4, max_new_tokens=20).completions) == 4  # 200: at the cap


def test_the_client_reads_the_caps_and_cuts_its_calls_to_fit(server, stub):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=TIMEOUT_S)
    assert (info.max_generate_prompts, info.max_generate_tokens) == (4, 200)
    prompts = [[5 + i] * 30 for i in range(13)]
    calls_before = server.scheduler.generate_jobs
    with GenerateClient([server.address], batch_size=64) as client:
        assert client.batch_size == 4 and client.max_call_tokens == 200
        replies = client.complete(prompts, max_new_tokens=30)
    assert len(replies) == 13
    # 13 prompts of 30 tokens and 30 new ones: three fit in 200 tokens, so 5 calls (the prompt cap
    # alone would make 4, which the service would refuse).
    assert server.scheduler.generate_jobs - calls_before == 5


# ---------------------------------------------------------------------------- memory in bytes

TOKENS = 1024
SAMPLE_BYTES = TOKENS * len(LAYERS) * 128 * 4  # [t, 2 layers, H = 128] float32: 1 MiB
BUDGET = 3 * SAMPLE_BYTES + 1000


def wait_for(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def requests(count: int, first_id: int) -> list[pb.ExtractRequest]:
    return [
        pb.ExtractRequest(sample_id=first_id + i, token_ids=[(7 * i + j) % 300 + 1 for j in range(TOKENS)],
                          layer_ids=LAYERS)
        for i in range(count)
    ]  # fmt: skip


def test_a_client_that_stops_reading_holds_at_most_the_byte_bound_then_is_cancelled(verifier_path):
    with running_service(
        verifier_path, target_layer_ids=LAYERS, max_pending_bytes=BUDGET, stall_timeout_s=2.0
    ) as server, open_channel(server.address) as channel:  # fmt: skip
        stub, budget = pb_grpc.HiddenStatesStub(channel), server.servicer.budget
        # A sends 60 requests (60 MiB) and never reads an answer: flow control stops the service.
        stalled = stub.Extract(iter(requests(60, first_id=0)), timeout=TIMEOUT_S)
        wait_for(lambda: budget.used > 0)
        held = []
        for _ in range(50):
            held.append(budget.used)
            time.sleep(0.02)
        assert 0 < max(held) <= BUDGET
        # B reads: it is served once the stalled stream is cancelled, not never.
        started = time.monotonic()
        answers = list(stub.Extract(iter(requests(5, first_id=100)), timeout=TIMEOUT_S))
        assert sorted({a.sample_id for a in answers}) == list(range(100, 105))
        assert time.monotonic() - started < TIMEOUT_S / 2
        with pytest.raises(grpc.RpcError) as raised:
            list(stalled)
        assert raised.value.code() == grpc.StatusCode.CANCELLED
        wait_for(lambda: budget.used == 0)  # every charge refunded, the cancelled stream's included
