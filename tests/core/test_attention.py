"""RoPE and RMSNorm against transformers' Qwen3 / Llama 3.1 code (a wrong RoPE layout fails silently)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from dflash_core.model.attention import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


def test_rope_matches_transformers_qwen3() -> None:
    config = Qwen3Config(
        hidden_size=256,
        num_attention_heads=4,
        head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    positions = torch.tensor([[0, 1, 5, 700, 4095], [3, 3, 2, 1, 0]])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 64, generator=gen)
    k = torch.randn(2, 2, 5, 64, generator=gen)
    cos_ref, sin_ref = Qwen3RotaryEmbedding(config)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = rope_cos_sin(
        positions, rope_inv_freq(head_dim=64, theta=1e6, scaling=None, device=torch.device("cpu"))
    )
    assert cos.dtype == torch.float32
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_rope_scaling_matches_transformers(scaling: dict) -> None:
    config = LlamaConfig(
        hidden_size=1024,
        num_attention_heads=8,
        head_dim=128,
        rope_parameters={**scaling, "rope_theta": 500000.0},
    )
    expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, torch.device("cpu"))
    ours = rope_inv_freq(head_dim=128, theta=500000.0, scaling=scaling, device=torch.device("cpu"))
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


def test_unsupported_rope_type_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(
            head_dim=64, theta=1e4, scaling={"rope_type": "yarn", "factor": 4.0}, device=torch.device("cpu")
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_qwen3(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-6), Qwen3RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        weight = 1 + 0.3 * torch.randn(32, generator=gen)
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
    x = (5 * torch.randn(3, 7, 32, generator=gen)).to(dtype)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
