"""`dflash serve-hidden-states --backend vllm --generate-only` on vLLM's CPU build, over 127.0.0.1.

The service is started through the CLI (which hands over to $DFLASH_VLLM_PYTHON) as a user would,
with vLLM's default engine process. What must hold: the engine starts with serving settings (no
capture hooks, prefix caching on, many sequences at once); GetInfo answers and Extract is refused
with FAILED_PRECONDITION naming the flag; greedy replies are the verifier's own; and callers whose
prompts share the engine's running batch (the scheduler adds each call's prompts as it arrives)
each get exactly the replies they get alone, sampled ones included (per-prompt seeds). All of it
holds with one engine and with two side by side (`--engine-replicas 2`).
"""

from __future__ import annotations

import os
import threading

import grpc
import pytest
import torch

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel
from services.hidden_states.generate_client import GenerateClient
from services.hidden_states.launcher import LocalService

pytestmark = pytest.mark.skipif(
    not os.environ.get("DFLASH_VLLM_PYTHON"),
    reason="DFLASH_VLLM_PYTHON is not set (`make test` sets it to .venv-vllm's python)",
)
CALL_TIMEOUT_S = 120.0
CALLERS = 4


@pytest.fixture(scope="module", params=[1, 2], ids=["one_engine", "two_engines"])
def engine_replicas(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def vllm_service(engine_replicas, verifier_path):
    # --enforce-eager: compiling the forward takes a minute on this CPU; the GPU runs compiled.
    service = LocalService.launch(
        ["-m", "services.cli.main", "serve-hidden-states", str(verifier_path), "--backend", "vllm",
         "--generate-only", "--dtype", "float32", "--max-length", "256",
         "--engine-replicas", str(engine_replicas),
         "--", "--port", "0", "--kv-cache-memory-bytes", "256M", "--enforce-eager"],
        timeout_s=300,
    )  # fmt: skip
    yield service
    assert service.stop() == 0, "".join(service.output[-30:])


@pytest.fixture(scope="module")
def stub(vllm_service):
    with open_channel(vllm_service.address) as channel:
        yield pb_grpc.HiddenStatesStub(channel)


def test_the_engines_start_with_serving_settings(vllm_service, engine_replicas):
    (line,) = [line for line in vllm_service.output if "engine(s) with" in line]
    assert f"starting {engine_replicas} engine(s)" in line
    assert "'enable_prefix_caching': True" in line and "'max_num_seqs': 1024" in line
    assert "worker_extension_cls" not in line  # no capture hooks
    assert "'enforce_eager': True" in line  # only because it was passed after `--`


def test_get_info_answers_and_extract_is_refused(engine_replicas, stub):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert info.backend == "vllm" and info.payload_port == 0
    assert info.engine_replicas == engine_replicas
    requests = iter([pb.ExtractRequest(sample_id=1, token_ids=[1, 2, 3], layer_ids=[4])])
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Extract(requests, timeout=CALL_TIMEOUT_S))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "started with --generate-only" in raised.value.details()


def test_greedy_replies_are_the_verifiers_own(vllm_service, engine_replicas, reference_model):
    prompts = [[5, 17, 33, 101, 7], [9, 8, 7], [300, 2, 44, 45, 46, 47, 48]]
    with GenerateClient([vllm_service.address]) as client:
        # An address with N engines keeps N times the calls in flight.
        assert (client.batch_size, client.requests_per_endpoint) == (512, 4 * engine_replicas)
        got = client.complete(prompts, max_new_tokens=8, keep_stop_token=True)
    for prompt, reply in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )[0, len(prompt) :].tolist()
        assert reply == expected[: len(reply)] and len(reply) >= 1


def request_of(caller: int) -> pb.GenerateRequest:
    generator = torch.Generator().manual_seed(caller)
    prompts = [torch.randint(0, 384, (3 + 5 * i,), generator=generator).tolist() for i in range(caller + 3)]
    return pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=p) for p in prompts],
        params=pb.SamplingParams(max_new_tokens=10 + 4 * caller, temperature=1.0, seed=1000 * caller),
    )


def test_callers_sharing_the_running_batch_get_what_they_get_alone(stub):
    def replies(request: pb.GenerateRequest) -> list[list[int]]:
        return [list(c.token_ids) for c in stub.Generate(request, timeout=CALL_TIMEOUT_S).completions]

    alone = [replies(request_of(k)) for k in range(CALLERS)]
    together: list[list[list[int]] | None] = [None] * CALLERS

    def call(k: int) -> None:
        together[k] = replies(request_of(k))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT_S)
    assert together == alone
    other_seed = request_of(1)
    other_seed.params.seed += 1
    assert replies(other_seed) != alone[1]


def test_a_caller_gone_mid_generation_leaves_the_engine_serving(vllm_service, stub):
    long = pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=[3, 4, 5, i]) for i in range(32)],
        params=pb.SamplingParams(max_new_tokens=200, temperature=1.0, seed=7),
    )
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(long, timeout=0.2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Its prompts are aborted in the engine; the next caller is served as usual.
    response = stub.Generate(request_of(0), timeout=CALL_TIMEOUT_S)
    assert [list(c.token_ids) for c in response.completions] == [
        list(c.token_ids) for c in stub.Generate(request_of(0), timeout=CALL_TIMEOUT_S).completions
    ]
    log = "".join(vllm_service.output)
    assert "generation step failed" not in log and "in the engine failed" not in log
