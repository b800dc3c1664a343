"""Tiny random verifiers built on the fly: a Qwen3 or Llama causal LM plus a ChatML tokenizer.

    tiny = make_tiny_verifier(tmp_path, arch="qwen3")   # also saved, so it loads by path
    model, tokenizer = tiny.model, tiny.tokenizer
    load_verifier(str(tiny.path), device="cpu")          # the same model through the real loader

Weights are random (transformers' init) with every RMSNorm gain redrawn as 1 + 0.3·N(0,1), so a
swapped, missing or doubled norm changes results (the default all-ones gain would hide some of
that). head_dim defaults to 32: vLLM's CPU attention refuses 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

try:
    from tests.factories.tokenizers import make_chat_tokenizer
except ImportError:  # pragma: no cover - the tokenizer factory ships in the same change set
    # TODO(lead): wire tests/factories/tokenizers.py:make_chat_tokenizer here if it moves.
    make_chat_tokenizer = None  # type: ignore[assignment]


@dataclass
class TinyVerifier:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path | None  # folder holding config, weights and tokenizer; None when not saved

    @property
    def name_or_path(self) -> str:
        return str(self.path) if self.path is not None else "tiny-random-verifier"


def make_tiny_verifier(
    tmp_path: Path | None = None,
    *,
    arch: Literal["qwen3", "llama"] = "qwen3",
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
) -> TinyVerifier:
    """A random `arch` causal LM in eval mode (float32, CPU) with a ChatML tokenizer.

    `vocab_size` defaults to len(tokenizer) + 16: the embedding has rows no text produces, as
    Qwen3's does, so the mask token resolves to `len(tokenizer)`. With `tmp_path`, model and
    tokenizer are saved to `tmp_path / f"tiny-{arch}-{seed}"` (safetensors; tied models omit
    `lm_head.weight`, like real ones).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if tokenizer is None:
        if make_chat_tokenizer is None:
            raise RuntimeError("tests/factories/tokenizers.py:make_chat_tokenizer is missing; pass tokenizer")
        tokenizer = make_chat_tokenizer()
    vocab = vocab_size if vocab_size is not None else len(tokenizer) + 16
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model: PreTrainedModel = Qwen3ForCausalLM(Qwen3Config(**common, rope_theta=10000.0))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    else:
        raise ValueError(f"arch must be 'qwen3' or 'llama', got {arch!r}")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    model.config.architectures = [type(model).__name__]
    model.eval()
    model.requires_grad_(False)

    path = None
    if tmp_path is not None:
        path = Path(tmp_path) / f"tiny-{arch}-{seed}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return TinyVerifier(model=model, tokenizer=tokenizer, path=path)


def make_turn_ending_verifier(tmp_path: Path, *, end_logit: float = 5.0, seed: int = 0) -> TinyVerifier:
    """A tiny verifier whose sampled turns END: `<|im_end|>` leads every next-token distribution.

    Random weights give every token about 1/vocab, so sampled user turns and replies would almost
    never close. Here dimension 0 of every embedding is a constant that dominates the final
    norm's output, and `<|im_end|>`'s LM-head row reads it: its logit is about `end_logit` above
    the others (probability ~0.15 per step with `end_logit` 5 and ~400 tokens). Saved under
    `tmp_path / "tiny-ending"`.
    """
    tiny = make_tiny_verifier(seed=seed)
    model, tokenizer = tiny.model, tiny.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight[0] = 1.0
        # After the final norm, dimension 0 is ~sqrt(hidden_size) (it holds nearly all the energy).
        model.lm_head.weight[end] = 0.0
        model.lm_head.weight[end, 0] = end_logit / model.config.hidden_size**0.5
    path = Path(tmp_path) / "tiny-ending"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TinyVerifier(model=model, tokenizer=tokenizer, path=path)
