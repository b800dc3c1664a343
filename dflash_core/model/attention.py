"""Context-plus-block attention of a DFlash draft layer, with Qwen3 QK-norm and RoPE.

A draft layer's queries are the block slots only. Its keys and values are the projected context
rows of the packed row followed by the projected block slots:

    K = rope(k_norm(k_proj([ctx ; h])))      V = v_proj([ctx ; h])      Q = rope(q_norm(q_proj(h)))

with ONE k_proj/v_proj/k_norm for both halves (docs/architecture.md). Which key a query may see is decided
by `dflash_core.masks`; this module only consumes the mask, in one of two forms that compute the
same function:

- a dense bool mask [B, Q, T+Q] for `scaled_dot_product_attention` (any device), or
- a flex_attention `BlockMask` (CUDA, compiled: it skips the fully masked 128x128 tiles, which
  for thousands of short blocks is nearly all of them).

Silent-failure notes:
- RoPE layout: rotate-half (NeoX) pairs dim i with i + head_dim/2, exactly as HF Qwen3/Llama and
  vLLM do. The interleaved (GPT-J) layout trains just as well but vLLM would serve a different
  function and acceptance collapses to ~1 with no error anywhere.
- cos/sin are computed in float32 from float32 inverse frequencies computed on the fly (never a
  buffer, so `model.to(bfloat16)` cannot quietly round the angles).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dflash_core.lazy_compile import compiled
from dflash_core.model.config import DrafterConfig

AttentionMask = torch.Tensor | BlockMask  # dense bool [B, Q, T+Q] (True = may attend) or a BlockMask


class RMSNorm(nn.Module):
    """Qwen3/Llama RMSNorm: `w * (x * rsqrt(mean(x^2) + eps))`, statistics in float32.

    Not Gemma's `(1 + w)` form: loading a Qwen3 gain into that form (or the reverse) trains
    fine and serves garbage.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# ---------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(*, head_dim: int, theta: float, scaling: dict | None, device: torch.device) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with optional `linear` or `llama3` scaling.

    `scaling` is the HF `rope_scaling` / `rope_parameters` dict minus `rope_theta` (as kept in
    `DrafterConfig.rope_scaling`); None or type "default" means plain RoPE.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise NotImplementedError(
        f"rope type {rope_type!r} is not supported by the DFlash drafter (supported: default, linear, "
        "llama3). Train with a verifier whose config has no such rope_scaling, or add the type to "
        "dflash_core/model/attention.py:rope_inv_freq with a test against transformers."
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths / factor, short ones kept, smooth between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, head_dim] in float32 for integer positions [B, L] (halves duplicated: NeoX)."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [B, L, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, head_dim]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D]; cos/sin [B, L, D]. Rotate-half form, in x's dtype (as HF Qwen3 does)."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


# ----------------------------------------------------------------------------------- attention


def _flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask, scale: float
) -> torch.Tensor:
    """flex_attention, compiled on CUDA (the fused kernel); eager elsewhere (materializes scores)."""
    fn = compiled(flex_attention) if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class DFlashAttention(nn.Module):
    """Queries from the block, keys/values from [context ; block], one set of projections."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * head_dim, hidden, bias=False)
        # Qwen3 QK-norm: per head, over head_dim, BEFORE RoPE. v gets no norm.
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        return x.unflatten(-1, (num_heads, self.head_dim)).transpose(1, 2)  # [B, heads, L, D]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context_rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
    ) -> torch.Tensor:
        """x: normed block slots [B, Q, H]; context: context features [B, T, H] (NOT re-normed).

        block_rope / context_rope: (cos, sin) [B, Q, D] / [B, T, D]. Returns [B, Q, H].
        """
        k_ctx, v_ctx = self.context_kv(context, context_rope=context_rope)
        return self.forward_cached(x, context_k=k_ctx, context_v=v_ctx, block_rope=block_rope, mask=mask)

    def context_kv(
        self, context: torch.Tensor, *, context_rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of context rows: rope(k_norm(k_proj(c))), v_proj(c), each [B, Hkv, T, D].

        A context row's key/value depend only on its own features and position, never on the
        block, so inference computes them once per committed position and caches them
        (`dflash_core.spec_decode`); training computes them here inside `forward`.
        """
        k_ctx = apply_rope(self.k_norm(self._heads(self.k_proj(context), self.num_kv_heads)), *context_rope)
        v_ctx = self._heads(self.v_proj(context), self.num_kv_heads)
        return k_ctx, v_ctx

    def forward_cached(
        self,
        x: torch.Tensor,
        *,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask | None,
    ) -> torch.Tensor:
        """Attention of block slots x [B, Q, H] over precomputed context keys/values [B, Hkv, T, D].

        mask: as in `forward` ([B, Q, T+Q] dense or a BlockMask), or None = every query sees
        every context row and every slot (a bidirectional block over its whole context).
        """
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), *block_rope)  # [B, Hq, Q, D]
        k_blk = apply_rope(self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads)), *block_rope)
        k = torch.cat((context_k, k_blk), dim=2)  # [B, Hkv, T+Q, D]: context columns first, then block slots
        v = torch.cat((context_v, self._heads(self.v_proj(x), self.num_kv_heads)), dim=2)
        # The norms' fp32 gains promote q/k under autocast; both kernels want one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if isinstance(mask, BlockMask):
            out = _flex(q, k, v, block_mask=mask, scale=self.scale)
        else:
            groups = self.num_heads // self.num_kv_heads
            # Query head i reads KV head i // groups: repeat_interleave, not repeat (a silent mix-up).
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            attn_mask = None if mask is None else mask.unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).flatten(2))  # [B, Q, H]
