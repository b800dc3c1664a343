"""The hidden-state service over real sockets on 127.0.0.1: a tiny verifier, no mocks.

What must hold (docs/architecture.md): Extract returns what a direct forward computes, at the layer ids
asked for and in their order, echoing the digest of the token ids; a bad sample gets its own
INVALID_ARGUMENT and the stream carries on; a trainer expecting another verifier is refused with
FAILED_PRECONDITION naming both sides; Generate is the verifier's own greedy decoding; health and
reflection answer; NaN from the verifier never reaches the wire; many clients at once all finish;
a client that stops reading costs the service a bounded number of samples; the CLI starts it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from transformers import PreTrainedModel

from dflash_core.capture import capture_hidden_states
from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.wire.codec import DecodedSample, FrameAssembler, token_ids_digest
from dflash_core.wire.identity import EXPECT_VERIFIER_KEY
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel
from services.hidden_states.engine_args import config_with_engine_args
from services.hidden_states.launcher import LocalService
from services.hidden_states.server import HiddenStateServer, ServiceAccess
from tests.factories.services import running_service, start_service_process
from tests.factories.verifiers import make_tiny_verifier
from tests.services.hidden_states.conftest import HIDDEN_SIZE, NUM_LAYERS

TARGET_LAYERS = [1, 2]  # the trainer's --target-layer-ids; N = 4 is served as well
SERVED_LAYERS = [1, 2, NUM_LAYERS]
VOCAB = 400  # the tiny verifier's embedding rows (tokenizer 384 + 16)
MAX_LENGTH = 96  # small, so over-long requests are cheap to make
# Small frames: a 96-token sample of two layers is 98 KiB, so real samples cross many frames.
FRAME_BYTES = 4096
# float32 on both sides. The service runs samples in right-padded batches, the reference runs
# each sample alone; attention kernels then reduce in a different order. Measured worst
# difference over 200 random samples of 1..90 tokens: 1.8e-7 on planes of magnitude ~0.3;
# asserted with ~50x margin. A wrong layer or a shifted position is off by ~1e-1.
ATOL = 1e-5
CALL_TIMEOUT_S = 60.0  # generous: a deadlock fails the test instead of hanging the suite

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


# ---------------------------------------------------------------------------- helpers


@dataclass
class ExtractResult:
    samples: dict[int, DecodedSample] = field(default_factory=dict)
    errors: dict[int, pb.SampleError] = field(default_factory=dict)


def extract(
    stub: pb_grpc.HiddenStatesStub,
    requests: Sequence[pb.ExtractRequest],
    *,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> ExtractResult:
    """One Extract call carrying `requests`, read to the end and reassembled."""
    result = ExtractResult()
    assembler = FrameAssembler()
    for response in stub.Extract(iter(requests), metadata=metadata, timeout=CALL_TIMEOUT_S):
        if response.HasField("error"):
            result.errors[response.sample_id] = response.error
            continue
        sample = assembler.add(response)
        if sample is not None:
            result.samples[sample.sample_id] = sample
    assert len(assembler) == 0, "the stream ended with a sample half sent"
    return result


def request(sample_id: int, token_ids: Sequence[int], layer_ids: Sequence[int]) -> pb.ExtractRequest:
    return pb.ExtractRequest(sample_id=sample_id, token_ids=list(token_ids), layer_ids=list(layer_ids))


def random_ids(length: int, *, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct(model: PreTrainedModel, token_ids: Sequence[int], layer_ids: Sequence[int]) -> torch.Tensor:
    """The reference: the sample alone through the same saved model, no padding, no service."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    return capture_hidden_states(model, ids, layer_ids=list(layer_ids))[0]  # [t, K, H]


def assert_matches_direct(
    sample: DecodedSample, model: PreTrainedModel, token_ids: Sequence[int], layer_ids: Sequence[int]
) -> None:
    assert sample.layer_ids == list(layer_ids)
    assert sample.tensor.shape == (len(token_ids), len(layer_ids), HIDDEN_SIZE)
    torch.testing.assert_close(sample.tensor, direct(model, token_ids, layer_ids), rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def server(verifier_path: Path) -> Iterator[HiddenStateServer]:
    with running_service(
        verifier_path, target_layer_ids=TARGET_LAYERS, max_length=MAX_LENGTH, max_frame_bytes=FRAME_BYTES,
        access=ServiceAccess(reflection=True),
    ) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def channel(server: HiddenStateServer) -> Iterator[grpc.Channel]:
    with open_channel(server.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.HiddenStatesStub:
    return pb_grpc.HiddenStatesStub(channel)


# ---------------------------------------------------------------------------- GetInfo and Extract


def test_get_info_describes_what_is_served(stub, server, verifier_path):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert list(info.layer_ids) == SERVED_LAYERS
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (NUM_LAYERS, HIDDEN_SIZE, VOCAB)
    assert (info.dtype, info.backend, info.max_length) == ("float32", "transformers", MAX_LENGTH)
    assert info.max_frame_bytes == FRAME_BYTES
    assert info.verifier_name_or_path == str(verifier_path)
    assert info.tokenizer_sha256 == server.backend.info.fingerprint.tokenizer_sha256


def test_extract_equals_a_direct_forward_in_the_requested_layer_order(stub, reference_model):
    # Lengths from 1 to max_length in one stream, layer orders that are not ascending.
    cases = [
        (1, [NUM_LAYERS, 1]),
        (2, [1]),
        (7, [2, NUM_LAYERS, 1]),
        (33, [NUM_LAYERS, 1]),
        (70, [NUM_LAYERS]),
        (MAX_LENGTH, [NUM_LAYERS, 1]),
    ]
    requests = [
        request(100 + i, random_ids(length, seed=i), layers) for i, (length, layers) in enumerate(cases)
    ]
    result = extract(stub, requests)
    assert not result.errors
    assert sorted(result.samples) == [r.sample_id for r in requests]
    for req in requests:
        sample = result.samples[req.sample_id]
        assert_matches_direct(sample, reference_model, req.token_ids, req.layer_ids)
    # The order check above only bites if the planes differ: N (first) is not layer 1 (second).
    longest = result.samples[requests[-1].sample_id].tensor
    assert (longest[:, 0] - longest[:, 1]).abs().max() > 100 * ATOL


def test_response_header_echoes_the_digest_of_the_request_tokens(stub):
    requests = [request(7, [5, 6, 7, 8], [1]), request(8, [8, 7, 6, 5], [1]), request(9, [5, 6, 7], [1])]
    result = extract(stub, requests)
    for req in requests:
        assert result.samples[req.sample_id].token_ids_sha256 == token_ids_digest(list(req.token_ids))
    # Same ids reordered or truncated: different digests, so a mixed-up response is caught.
    assert len({s.token_ids_sha256 for s in result.samples.values()}) == 3


BAD_REQUESTS = {
    "unknown layer id": ([10, 11, 12], [NUM_LAYERS, 3], "layer ids [3] are not served here"),
    "layer id beyond N": ([10, 11, 12], [NUM_LAYERS + 1], f"layer ids [{NUM_LAYERS + 1}] are not served"),
    "empty token list": ([], [1], "token_ids is empty"),
    "over-long token list": (
        [1] * (MAX_LENGTH + 1),
        [1],
        f"{MAX_LENGTH + 1} tokens is longer than this service's max length {MAX_LENGTH}",
    ),
    "token id outside the vocabulary": ([3, VOCAB, 4], [1], f"token id {VOCAB} is outside"),
    "no layer ids": ([10, 11], [], "layer_ids is empty"),
    "repeated layer id": ([10, 11], [1, NUM_LAYERS, 1], "repeats an id"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=lambda case: case.replace(" ", "-"))
def test_a_bad_sample_gets_invalid_argument_and_the_stream_carries_on(stub, reference_model, case):
    token_ids, layer_ids, problem = BAD_REQUESTS[case]
    good_before = request(1, random_ids(9, seed=1), [NUM_LAYERS, 2])
    good_after = [request(3 + i, random_ids(5 + 9 * i, seed=3 + i), [1, NUM_LAYERS]) for i in range(3)]
    result = extract(stub, [good_before, request(2, token_ids, layer_ids), *good_after])
    assert set(result.errors) == {2}
    error = result.errors[2]
    assert error.code == INVALID_ARGUMENT, error
    assert error.message.startswith("sample 2: ") and problem in error.message, error.message
    # Every valid sample, before and after the bad one, arrives and is right.
    assert sorted(result.samples) == [1, 3, 4, 5]
    for req in [good_before, *good_after]:
        assert_matches_direct(result.samples[req.sample_id], reference_model, req.token_ids, req.layer_ids)


def test_expecting_another_verifier_is_refused_naming_both_sides(stub, server, reference_model):
    served = server.backend.info.fingerprint
    other = served.model_copy(update={"hidden_size": 2 * HIDDEN_SIZE})
    with pytest.raises(grpc.RpcError) as raised:
        extract(stub, [request(1, [1, 2, 3], [1])], metadata=[(EXPECT_VERIFIER_KEY, other.model_dump_json())])
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = raised.value.details()
    assert "hidden size" in details and str(2 * HIDDEN_SIZE) in details and str(HIDDEN_SIZE) in details
    # The refusal was about the fingerprint, not the metadata: the served one is accepted ...
    accepted = extract(
        stub, [request(1, [1, 2, 3], [1])], metadata=[(EXPECT_VERIFIER_KEY, served.model_dump_json())]
    )
    assert list(accepted.samples) == [1]
    # ... and the server still serves a plain call afterwards.
    after = extract(stub, [request(2, [4, 5, 6, 7], [NUM_LAYERS])])
    assert_matches_direct(after.samples[2], reference_model, [4, 5, 6, 7], [NUM_LAYERS])


def test_malformed_expect_verifier_metadata_is_invalid_argument(stub):
    broken = json.dumps({"name_or_path": "x"})  # fields missing
    with pytest.raises(grpc.RpcError) as raised:
        extract(stub, [request(1, [1, 2], [1])], metadata=[(EXPECT_VERIFIER_KEY, broken)])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert EXPECT_VERIFIER_KEY in raised.value.details()


# ---------------------------------------------------------------------------- Generate


def test_greedy_generate_equals_the_models_own_generate(stub, reference_model):
    prompts = [random_ids(length, seed=50 + length) for length in (1, 6, 23)]
    max_new_tokens = 12
    response = stub.Generate(
        pb.GenerateRequest(
            prompts=[pb.Prompt(token_ids=p) for p in prompts],
            params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert len(response.completions) == len(prompts)
    eos = reference_model.generation_config.eos_token_id
    for prompt, completion in zip(prompts, response.completions, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = reference_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        expected = output[0, len(prompt) :].tolist()
        assert list(completion.token_ids) == expected
        assert completion.finish_reason == ("stop" if expected[-1] == eos else "length")


GENERATE_INVALID = {
    "no prompts": ([], 4, "no prompts"),
    "empty prompt": ([[1, 2], []], 4, "prompt 1 is empty"),
    "max_new_tokens 0": ([[1, 2]], 0, "max_new_tokens must be >= 1"),
    "prompt plus max_new_tokens over max_length": (
        [[1] * (MAX_LENGTH - 4)],
        5,
        f"exceeds the service's max length {MAX_LENGTH}",
    ),
    "token id outside the vocabulary": ([[1, VOCAB + 3]], 4, f"token id {VOCAB + 3} is outside"),
}


@pytest.mark.parametrize("case", list(GENERATE_INVALID), ids=lambda case: case.replace(" ", "-"))
def test_invalid_generate_is_invalid_argument(stub, case):
    prompts, max_new_tokens, problem = GENERATE_INVALID[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(
            pb.GenerateRequest(
                prompts=[pb.Prompt(token_ids=p) for p in prompts],
                params=pb.SamplingParams(max_new_tokens=max_new_tokens),
            ),
            timeout=CALL_TIMEOUT_S,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in raised.value.details()


def test_generate_at_exactly_max_length_is_accepted(stub):
    # The boundary of the check above: prompt + max_new_tokens == max_length is allowed.
    response = stub.Generate(
        pb.GenerateRequest(
            prompts=[pb.Prompt(token_ids=[1] * (MAX_LENGTH - 4))], params=pb.SamplingParams(max_new_tokens=4)
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert 1 <= len(response.completions[0].token_ids) <= 4


# ---------------------------------------------------------------------------- health, reflection


def test_health_is_serving_for_the_server_and_the_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "dflash.v1.HiddenStates"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    # A name the server does not know is NOT_FOUND: the check above is not a blanket yes.
    with pytest.raises(grpc.RpcError) as raised:
        health.Check(health_pb2.HealthCheckRequest(service="dflash.v1.Nope"), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(channel):
    # On when asked for (--reflection); off by default (tests/services/hidden_states/test_access.py).
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"dflash.v1.HiddenStates", "grpc.health.v1.Health"} <= services
    # A client with no stubs can learn the methods from the server alone.
    file = database.FindFileContainingSymbol("dflash.v1.HiddenStates")
    (service,) = [s for s in file.service if s.name == "HiddenStates"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    assert methods == {"GetInfo": (False, False), "Extract": (True, True), "Generate": (False, False)}


# ---------------------------------------------------------------------------- a NaN verifier


@pytest.fixture(scope="module")
def nan_verifier_path(tmp_path_factory) -> Path:
    """A tiny verifier whose layer 1 MLP is NaN: ids 2 and N are NaN, id 1 (before it) is fine."""
    tiny = make_tiny_verifier(tmp_path_factory.mktemp("nan"), num_layers=NUM_LAYERS, hidden_size=HIDDEN_SIZE)
    with torch.no_grad():
        tiny.model.model.layers[1].mlp.down_proj.weight.fill_(math.nan)
    tiny.model.save_pretrained(tiny.path)
    return tiny.path


def test_nan_from_the_verifier_is_an_internal_error_and_the_server_stays_up(nan_verifier_path):
    with (
        running_service(nan_verifier_path, target_layer_ids=TARGET_LAYERS) as nan_server,
        open_channel(nan_server.address) as nan_channel,
    ):
        nan_stub = pb_grpc.HiddenStatesStub(nan_channel)
        # Both ask for a NaN plane (N, and 2 next to a finite 1); the control asks for 1 alone.
        bad = [request(0, random_ids(4, seed=0), [NUM_LAYERS]), request(1, random_ids(5, seed=1), [1, 2])]
        fine = request(9, random_ids(6, seed=9), [1])
        for _ in range(2):  # twice: a failed sample must not take the worker down
            result = extract(nan_stub, [*bad, fine])
            assert set(result.errors) == {0, 1}
            for error in result.errors.values():
                assert error.code == INTERNAL and "NaN" in error.message, error
            assert list(result.samples) == [9]
            assert torch.isfinite(result.samples[9].tensor).all()
        assert nan_stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S).num_layers == NUM_LAYERS
        assert nan_server.scheduler.samples_served == 2  # only the finite sample, twice


# ---------------------------------------------------------------------------- load


def test_many_concurrent_clients_all_finish_with_correct_tensors(server, reference_model):
    num_clients, per_client = 12, 20
    results: dict[int, ExtractResult] = {}
    failures: list[BaseException] = []

    def client(index: int) -> None:
        requests = [
            request(
                index * 1000 + i,
                random_ids(1 + (index * 7 + i * 13) % MAX_LENGTH, seed=index * 1000 + i),
                [NUM_LAYERS, 1, 2][: 1 + (index + i) % 3],
            )
            for i in range(per_client)
        ]
        try:
            with open_channel(server.address) as own_channel:  # a separate connection per client
                results[index] = extract(pb_grpc.HiddenStatesStub(own_channel), requests)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(num_clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still waiting: the service deadlocked"
    assert not failures, failures
    for index in range(num_clients):
        assert not results[index].errors
        assert len(results[index].samples) == per_client
    for index, result in results.items():
        for i in range(per_client):
            sample_id = index * 1000 + i
            length = 1 + (index * 7 + i * 13) % MAX_LENGTH
            layers = [NUM_LAYERS, 1, 2][: 1 + (index + i) % 3]
            sample = result.samples[sample_id]
            assert_matches_direct(sample, reference_model, random_ids(length, seed=sample_id), layers)


def _reader_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "extract-reader")


def test_a_client_that_never_reads_costs_a_bounded_number_of_samples(verifier_path):
    max_pending = 4
    # 64 tokens x 3 layers x 128 x 4 bytes = 96 KiB per sample: more than one HTTP/2 window.
    tokens = [5] * 64
    # Slack beyond max_pending: a sample's slot is freed once gRPC has taken its frames, so what
    # the HTTP/2 flow-control window holds costs no slot. The client pins its receive window at the
    # 64 KiB default (BDP probing grows it to ~4 MiB: measured 46 such samples computed), so the
    # first 96 KiB sample never finishes sending and keeps its slot. Measured: exactly 4. The 1
    # allows for gRPC buffering one message past the window.
    slack = 1
    client_options = [("grpc.http2.bdp_probe", 0)]
    with running_service(
        verifier_path, target_layer_ids=TARGET_LAYERS, max_pending_per_stream=max_pending
    ) as lone:
        readers_before = _reader_threads()
        with grpc.insecure_channel(lone.address, options=client_options) as slow_channel:
            requests = (request(i, tokens, SERVED_LAYERS) for i in range(300))
            call = pb_grpc.HiddenStatesStub(slow_channel).Extract(requests, timeout=CALL_TIMEOUT_S)
            # An unbounded service keeps computing (milliseconds a sample) through these 2 s.
            deadline = time.monotonic() + 10
            while lone.scheduler.samples_served < max_pending and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2.0)
            served = lone.scheduler.samples_served
            assert 1 <= served <= max_pending + slack, f"{served} samples computed for a client reading none"
            call.cancel()
            # Cancelling frees the stream's reader thread and drops its queued requests ...
            deadline = time.monotonic() + 10
            while _reader_threads() > readers_before and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _reader_threads() == readers_before, "the cancelled stream's reader is still running"
            # A sample the worker had already taken when the cancel landed still finishes (at most
            # the stream's slots); nothing beyond them is computed for the vanished client.
            time.sleep(0.5)
            after_cancel = lone.scheduler.samples_served
            assert after_cancel <= max_pending + slack, after_cancel
        # ... and another client is served right away, with more samples than max_pending (the
        # slots are recycled as it reads).
        with open_channel(lone.address) as fresh:
            requests = [request(i, [1, 2, 3 + i], [1]) for i in range(3 * max_pending)]
            result = extract(pb_grpc.HiddenStatesStub(fresh), requests)
        assert sorted(result.samples) == list(range(3 * max_pending))
        assert lone.scheduler.samples_served == after_cancel + 3 * max_pending


def test_streams_beyond_max_streams_are_refused_and_health_still_answers(verifier_path):
    max_streams = 2
    attempts = max_streams + 10  # more than max_streams plus the server's 8 spare pool threads
    release = threading.Event()

    def held_open(sample_id: int) -> Iterator[pb.ExtractRequest]:
        yield request(sample_id, [1, 2, 3], [NUM_LAYERS])
        release.wait(CALL_TIMEOUT_S)  # keeps the stream (and its server thread) busy

    refused: list[int] = []
    calls = []
    with (
        running_service(verifier_path, target_layer_ids=TARGET_LAYERS, max_streams=max_streams) as busy,
        open_channel(busy.address) as busy_channel,
    ):
        busy_stub = pb_grpc.HiddenStatesStub(busy_channel)
        try:
            for i in range(attempts):
                call = busy_stub.Extract(held_open(i), timeout=CALL_TIMEOUT_S)
                calls.append(call)
                try:
                    next(call)  # the stream is live once its first sample arrives
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    refused.append(i)
            # With every stream slot taken, the service still answers health checks and GetInfo.
            check = health_pb2_grpc.HealthStub(busy_channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            assert busy_stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S).num_layers == NUM_LAYERS
        finally:
            release.set()
            for call in calls:
                call.cancel()
    assert refused == list(range(max_streams, attempts))


# ---------------------------------------------------------------------------- as a process


def _get_info(address: str) -> pb.ServiceInfo:
    with open_channel(address) as process_channel:
        return pb_grpc.HiddenStatesStub(process_channel).GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S)


def test_service_process_survives_a_kill_and_restarts_on_the_same_port(verifier_path, reference_model):
    service = start_service_process(verifier_path, TARGET_LAYERS)
    try:
        assert list(_get_info(service.address).layer_ids) == SERVED_LAYERS
        port = service.port
        service.kill()
        with pytest.raises(grpc.RpcError) as raised:
            _get_info(service.address)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        service = start_service_process(verifier_path, TARGET_LAYERS, port=port)
        assert service.port == port
        with open_channel(service.address) as process_channel:
            ids = random_ids(12, seed=12)
            result = extract(pb_grpc.HiddenStatesStub(process_channel), [request(1, ids, [NUM_LAYERS])])
        assert_matches_direct(result.samples[1], reference_model, ids, [NUM_LAYERS])
    finally:
        exit_code = service.stop()
    assert exit_code == 0, "".join(service.output)  # SIGTERM drains and exits cleanly


def test_cli_serve_hidden_states_prints_the_ready_line_and_answers(verifier_path):
    service = LocalService.launch(
        [
            "-m",
            "services.cli.main",
            "serve-hidden-states",
            str(verifier_path),
            "--target-layer-ids",
            *map(str, TARGET_LAYERS),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--",
            "--port",
            "0",  # after `--`, as the tutorial's launch command puts it
        ]
    )
    try:
        assert service.address.startswith("127.0.0.1:") and service.port > 0
        info = _get_info(service.address)
        assert list(info.layer_ids) == SERVED_LAYERS and info.dtype == "float32"
        assert info.verifier_name_or_path == str(verifier_path)
    finally:
        assert service.stop() == 0, "".join(service.output)


# ---------------------------------------------------------------------------- engine args


@pytest.fixture
def base_config() -> ServeHiddenStatesConfig:
    return ServeHiddenStatesConfig(model="m", engine_args=["--enforce-eager"])


@pytest.mark.parametrize("args", [["--port", "8001"], ["--port=8001"]], ids=["space", "equals"])
def test_engine_args_port_is_taken_by_the_service(base_config, args):
    config = config_with_engine_args(base_config, args)
    assert config.port == 8001
    assert config.engine_args == ["--enforce-eager"]  # not handed on to vLLM


def test_engine_args_host_is_taken_by_the_service(base_config):
    config = config_with_engine_args(base_config, ["--host", "10.1.2.3"])
    assert config.host == "10.1.2.3" and config.port == base_config.port


def test_engine_args_other_flags_are_kept_in_order(base_config):
    passthrough = [
        "--gpu-memory-utilization",
        "0.9",
        "--port",
        "9000",
        "--max-model-len=4096",
        "--portal",  # only the exact flag is ours, not a prefix of another
        "x",
        "--host=0.0.0.0",
        "--enable-prefix-caching",
    ]
    config = config_with_engine_args(base_config, passthrough)
    assert (config.port, config.host) == (9000, "0.0.0.0")
    assert config.engine_args == [
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.9",
        "--max-model-len=4096",
        "--portal",
        "x",
        "--enable-prefix-caching",
    ]


def test_engine_args_without_own_flags_leave_the_config_alone(base_config):
    assert config_with_engine_args(base_config, []) == base_config
    config = config_with_engine_args(base_config, ["--seed", "3"])
    assert config.engine_args == ["--enforce-eager", "--seed", "3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "http"], "--port after `--` must be a number in 0..65535, got 'http'"),
        (["--port=-1"], "must be a number"),
        (["--port"], "--port after `--` needs a value"),
        (["--host="], "--host after `--` needs a value"),
    ],
)
def test_engine_args_bad_own_flags_exit_with_a_message(base_config, args, message):
    with pytest.raises(SystemExit, match=message):
        config_with_engine_args(base_config, args)


def test_engine_args_port_out_of_range_exits_with_a_message(base_config):
    with pytest.raises(SystemExit, match="--port"):
        config_with_engine_args(base_config, ["--port", "70000"])
