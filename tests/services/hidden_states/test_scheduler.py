"""Generate calls that queue together run as one backend call, and nobody can tell.

A real service on 127.0.0.1 (transformers backend, the tiny verifier), callers on their own
threads: one long call keeps the worker busy while several callers send sampled requests with
seeds of their own; those queue up and are merged into one `backend.generate` call. Each caller
must get exactly the replies it gets when its request runs alone (prompt i of a request samples
with seed + i whatever else shares the call), and the scheduler's counters must show the merge.
A long call runs in slices of the backend's token budget with Extract batches between them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel
from services.hidden_states.server import HiddenStateServer
from tests.factories.services import running_service

CALL_TIMEOUT_S = 120.0
CALLERS = 4


@pytest.fixture(scope="module")
def server(verifier_path) -> Iterator[HiddenStateServer]:
    with running_service(verifier_path, target_layer_ids=[1]) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.HiddenStatesStub]:
    with open_channel(server.address) as channel:
        yield pb_grpc.HiddenStatesStub(channel)


def request_of(caller: int) -> pb.GenerateRequest:
    """Caller k: k + 2 prompts of its own, sampled at temperature 1 with seed 100 k."""
    generator = torch.Generator().manual_seed(caller)
    prompts = [torch.randint(0, 384, (3 + 2 * i,), generator=generator).tolist() for i in range(caller + 2)]
    return pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=p) for p in prompts],
        params=pb.SamplingParams(max_new_tokens=6 + caller, temperature=1.0, top_p=0.95, seed=100 * caller),
    )


def replies(response: pb.GenerateResponse) -> list[tuple[list[int], str]]:
    return [(list(c.token_ids), c.finish_reason) for c in response.completions]


def test_generate_jobs_queued_together_are_merged_and_each_gets_its_own_replies(server, stub):
    alone = [replies(stub.Generate(request_of(k), timeout=CALL_TIMEOUT_S)) for k in range(CALLERS)]
    # Seeds matter: the same request with another seed samples other replies.
    other_seed = request_of(1)
    other_seed.params.seed += 1
    assert replies(stub.Generate(other_seed, timeout=CALL_TIMEOUT_S)) != alone[1]

    scheduler = server.scheduler
    jobs_before, calls_before = scheduler.generate_jobs, scheduler.generate_calls
    # A long greedy call occupies the worker while the callers' requests queue behind it.
    blocker = pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=[7, 8, 9, i]) for i in range(24)],
        params=pb.SamplingParams(max_new_tokens=24),
    )
    blocker_thread = threading.Thread(
        target=stub.Generate, args=(blocker,), kwargs={"timeout": CALL_TIMEOUT_S}
    )
    blocker_thread.start()
    deadline = time.monotonic() + 30
    while scheduler.generate_jobs == jobs_before:  # the worker has taken the blocker
        assert time.monotonic() < deadline, "the blocker never reached the backend"
        time.sleep(0.005)

    together: list[list[tuple[list[int], str]] | None] = [None] * CALLERS

    def call(k: int) -> None:
        together[k] = replies(stub.Generate(request_of(k), timeout=CALL_TIMEOUT_S))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in [blocker_thread, *threads]:
        thread.join(CALL_TIMEOUT_S)

    assert together == alone
    assert scheduler.generate_jobs - jobs_before == 1 + CALLERS
    # The blocker alone, then every caller in one merged call.
    assert scheduler.generate_calls - calls_before == 2


def test_a_long_generate_call_runs_in_slices_and_extract_is_served_between_them(verifier_path, stub):
    """A token budget of 40 holds one prompt (4 + 32 tokens) a slice: 60 slices for the long call."""
    long_call = pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=[7, 8, 9, i]) for i in range(60)],
        params=pb.SamplingParams(max_new_tokens=32, temperature=1.0, seed=5),
    )
    with (
        running_service(verifier_path, target_layer_ids=[1], max_batch_tokens=40) as sliced,
        open_channel(sliced.address) as channel,
    ):
        sliced_stub = pb_grpc.HiddenStatesStub(channel)
        result: list[pb.GenerateResponse] = []
        thread = threading.Thread(
            target=lambda: result.append(sliced_stub.Generate(long_call, timeout=CALL_TIMEOUT_S))
        )
        thread.start()
        deadline = time.monotonic() + 30
        while sliced.scheduler.generate_calls < 2:  # the long call is under way
            assert time.monotonic() < deadline, "the long call never reached the backend"
            time.sleep(0.005)
        request = pb.ExtractRequest(sample_id=1, token_ids=[5, 6, 7, 8], layer_ids=[1])
        (answer,) = list(sliced_stub.Extract(iter([request]), timeout=CALL_TIMEOUT_S))
        assert answer.sample_id == 1 and not answer.HasField("error")
        assert thread.is_alive(), "Extract waited for the whole Generate call"
        thread.join(CALL_TIMEOUT_S)
        assert sliced.scheduler.generate_calls >= 60
    # Slicing changes no reply: each prompt keeps its own seed.
    whole = stub.Generate(long_call, timeout=CALL_TIMEOUT_S)
    assert replies(result[0]) == replies(whole)
