"""The whole service with vLLM behind it: `dflash serve-hidden-states --backend vllm` started from
this environment (which has no vLLM, so the CLI hands over to $DFLASH_VLLM_PYTHON), fed by the
trainer's own client over 127.0.0.1.

The backend-level comparison lives in test_vllm_backend.py; this one proves the parts join: the
CLI's hand-over, `--` engine arguments, the server around the vllm backend, the wire, and
`GrpcSource`'s checks, with tensors equal to a direct forward of the same model.
"""

from __future__ import annotations

import os

import pytest
import torch

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel
from services.hidden_states.launcher import LocalService
from services.trainer.grpc_source import GrpcSource
from services.trainer.sources import InProcessSource, SampleRequest
from tests.services.hidden_states.conftest import NUM_LAYERS

pytestmark = pytest.mark.skipif(
    not os.environ.get("DFLASH_VLLM_PYTHON"),
    reason="DFLASH_VLLM_PYTHON is not set (`make test` sets it to .venv-vllm's python)",
)
LAYERS = [1, 2]
# test_vllm_backend.py measured max |vllm - transformers| = 2e-7 in float32; same margin here.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def vllm_service(verifier_path):
    service = LocalService.launch(
        ["-m", "services.cli.main", "serve-hidden-states", str(verifier_path), "--backend", "vllm",
         "--target-layer-ids", *map(str, LAYERS), "--dtype", "float32", "--max-length", "256",
         "--", "--port", "0", "--kv-cache-memory-bytes", "256M"],
        timeout_s=240,
    )  # fmt: skip
    yield service
    assert service.stop() == 0, "".join(service.output[-30:])


def test_vllm_service_streams_what_a_direct_forward_computes(vllm_service, reference_model):
    source = GrpcSource([vllm_service.address], target_layer_ids=LAYERS)
    try:
        assert source.service_info.backend == "vllm"
        assert list(source.service_info.layer_ids) == [*LAYERS, NUM_LAYERS]
        generator = torch.Generator().manual_seed(3)
        requests = [
            SampleRequest(sample_id=i, input_ids=torch.randint(0, 384, (length,), generator=generator))
            for i, length in enumerate([7, 120, 33, 1, 64])
        ]
        got = source.extract(requests)
    finally:
        source.close()
    expected = InProcessSource(
        model=reference_model, fingerprint=source.fingerprint, target_layer_ids=LAYERS
    ).extract(requests)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.aux, b.aux, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(a.last, b.last, atol=ATOL, rtol=RTOL)


def test_vllm_service_generates_the_verifiers_greedy_continuation(vllm_service, reference_model):
    prompt = [5, 17, 33, 101, 7]
    with open_channel(vllm_service.address) as channel:
        response = pb_grpc.HiddenStatesStub(channel).Generate(
            pb.GenerateRequest(
                prompts=[pb.Prompt(token_ids=prompt)], params=pb.SamplingParams(max_new_tokens=8)
            ),
            timeout=120,
        )
    ids = torch.tensor([prompt])
    expected = reference_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
    produced = list(response.completions[0].token_ids)
    assert produced == expected[: len(produced)] and len(produced) >= 1
