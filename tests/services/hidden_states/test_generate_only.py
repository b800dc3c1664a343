"""`serve-hidden-states --generate-only`: Generate and GetInfo answer, Extract is refused by name.

A real service on 127.0.0.1 with the transformers backend (the flag only turns Extract off there;
the vllm backend's engine settings are tested in test_vllm_generate_only.py). What a trainer sees
when pointed at such a service: `GrpcSource` gets through GetInfo, then its first Extract stops
it with FAILED_PRECONDITION naming the flag, never a retry loop or a hang.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.config_args import ENV_SWITCH
from dflash_core.config_handover import config_from_handover, handover_args
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.backends.transformers_backend import TransformersBackend
from services.hidden_states.endpoints import open_channel
from services.hidden_states.server import HiddenStateServer
from services.trainer.grpc_source import GrpcSource, HiddenStateServiceError
from services.trainer.sources import SampleRequest

CALL_TIMEOUT_S = 60.0
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def server(verifier_path) -> Iterator[HiddenStateServer]:
    backend = TransformersBackend.load(
        str(verifier_path), target_layer_ids=LAYERS, dtype=torch.float32, device="cpu", generate_only=True
    )
    server = HiddenStateServer(backend, host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.HiddenStatesStub]:
    with open_channel(server.address) as channel:
        yield pb_grpc.HiddenStatesStub(channel)


def test_extract_is_refused_naming_the_flag(stub):
    requests = iter([pb.ExtractRequest(sample_id=1, token_ids=[1, 2, 3], layer_ids=LAYERS)])
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Extract(requests, timeout=CALL_TIMEOUT_S))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "started with --generate-only; it serves Generate only" in raised.value.details()


def test_get_info_and_generate_answer(stub, reference_model):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert info.backend == "transformers" and info.num_layers == 4
    prompt = [5, 17, 33, 101, 7]
    response = stub.Generate(
        pb.GenerateRequest(prompts=[pb.Prompt(token_ids=prompt)], params=pb.SamplingParams(max_new_tokens=8)),
        timeout=CALL_TIMEOUT_S,
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = reference_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )[0, len(prompt) :].tolist()
    assert list(response.completions[0].token_ids) == expected


def test_a_trainer_pointed_at_it_stops_with_the_reason(server):
    source = GrpcSource([server.address], target_layer_ids=LAYERS, timeout_s=60.0)
    try:
        with pytest.raises(HiddenStateServiceError, match="--generate-only"):
            source.extract([SampleRequest(sample_id=0, input_ids=torch.arange(1, 9))])
    finally:
        source.close()


def test_the_config_survives_the_hand_over_to_another_python(monkeypatch):
    # `--backend vllm` without vLLM here restarts the service under $DFLASH_VLLM_PYTHON, and
    # LocalService starts it the same way: the resolved config as one JSON argument.
    config = ServeHiddenStatesConfig(
        backend="vllm", generate_only=True, engine_replicas=3, port=0, engine_args=["--enforce-eager"]
    )
    # A variable the child inherits must not change what the parent resolved.
    monkeypatch.setenv(ENV_SWITCH, "1")
    monkeypatch.setenv("DFLASH_ENGINE_REPLICAS", "1")
    monkeypatch.setenv("DFLASH_BACKEND", "transformers")
    assert config_from_handover(ServeHiddenStatesConfig, handover_args(config)) == config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "x"], "expected `--resolved-config JSON`"),
        (["--resolved-config", "{not json"], "Invalid JSON"),
        (["--resolved-config", '{"engine_replicas": 0}'], "engine_replicas"),
    ],
)
def test_a_malformed_hand_over_is_refused_with_the_reason(argv, message):
    with pytest.raises(SystemExit, match=message):
        config_from_handover(ServeHiddenStatesConfig, argv)


@pytest.mark.parametrize(
    "settings",
    [dict(backend="transformers", generate_only=True), dict(backend="vllm", generate_only=False)],
    ids=["transformers", "extraction"],
)
def test_several_engines_are_refused_outside_vllm_generation(settings):
    with pytest.raises(ValueError, match="--engine-replicas 2 needs --backend vllm --generate-only"):
        ServeHiddenStatesConfig(engine_replicas=2, **settings)
