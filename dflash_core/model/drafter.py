"""The DFlash drafter, top to bottom like the paper ("DFlash: Block Diffusion for Flash Speculative
Decoding", z-lab, 2025; speculators 0.9.0's `dflash` model for the checkpoint format and the test
vectors, testvectors/dflash/README.md; no code copied).

    context = hidden_norm(fc(aux))          aux [B, T, K*Hv] -> [B, T, H], once, no input norm
    x = embed(block ids)                    [B, Q, H]: slot 0 the anchor token, then mask tokens
    for layer: x = x + attn(ln1(x), context); x = x + mlp(ln2(x))   (attention.py: [context ; block])
    logits = lm_head(norm(x))               [B, Q, V or D]

Module names are the checkpoint tensor names, so `state_dict()` IS the speculators/vLLM checkpoint
(`lm_head`, `d2t`, `t2d` only with a reduced draft vocab). Single-device code; parallelism is
applied in services/trainer/parallelize.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dflash_core.model.attention import AttentionMask, DFlashAttention, RMSNorm, rope_cos_sin, rope_inv_freq
from dflash_core.model.config import DrafterConfig


class DFlashMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Qwen3)."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    """Pre-norm Qwen3 layer whose attention also reads the (un-normed) context features."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DFlashMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context_rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
    ) -> torch.Tensor:
        # input_layernorm applies to the block only: the context is already hidden_norm'ed, and
        # norming it again here would silently diverge from what vLLM serves.
        x = x + self.self_attn(
            self.input_layernorm(x), context, block_rope=block_rope, context_rope=context_rope, mask=mask
        )
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(
        self,
        x: torch.Tensor,
        *,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask | None,
    ) -> torch.Tensor:
        """`forward` with this layer's context keys/values already computed (inference)."""
        x = x + self.self_attn.forward_cached(
            self.input_layernorm(x),
            context_k=context_k,
            context_v=context_v,
            block_rope=block_rope,
            mask=mask,
        )
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class DrafterOutput:
    hidden: torch.Tensor  # [B, Q, H]: norm(x) after the last layer, what the LM head reads
    context: torch.Tensor  # [B, T, H]: hidden_norm(fc(aux))
    layer_outputs: list[torch.Tensor] = field(default_factory=list)  # residual after each layer (opt-in)


class DFlashDrafter(nn.Module):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(config.num_aux_layers * config.verifier_hidden_size, H, bias=False)
        self.hidden_norm = RMSNorm(H, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        if config.has_reduced_vocab:
            # Frozen copy of the verifier's LM-head rows for the draft vocab (see set_draft_vocab).
            self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
            # d2t[i] is an OFFSET: target id = i + d2t[i] (speculators/vLLM). t2d[t]: t is in the draft vocab.
            # Until set_draft_vocab runs: the identity map onto the first D ids (consistent, not useful).
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
            t2d[: config.draft_vocab_size] = True
            self.register_buffer("t2d", t2d)
        else:
            self.lm_head = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """HF Qwen3-style init: N(0, std) for trainable linears, ones for RMSNorm gains."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ----------------------------------------------------------------- forward
    def context_features(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_norm(fc(aux)): [B, T, K*Hv] -> [B, T, H]. Aux columns must be in layer-id order."""
        return self.hidden_norm(self.fc(aux_hidden_states))

    def forward(
        self,
        *,
        block_embeds: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        block_position_ids: torch.Tensor,
        context_position_ids: torch.Tensor,
        masks: Sequence[AttentionMask],
        return_layer_outputs: bool = False,
    ) -> DrafterOutput:
        """Run all blocks of a batch in one pass.

        block_embeds [B, Q, H] (verifier embedding of the block ids); aux_hidden_states [B, T, K*Hv];
        block_position_ids [B, Q] and context_position_ids [B, T] (RoPE positions); masks: one per
        layer, dense [B, Q, T+Q] bool or a flex BlockMask (`dflash_core.masks`).
        """
        if len(masks) != len(self.layers):
            raise ValueError(f"got {len(masks)} masks for {len(self.layers)} layers (one per layer)")
        context = self.context_features(aux_hidden_states)  # [B, T, H]
        inv_freq = rope_inv_freq(
            head_dim=self.config.head_dim,
            theta=self.config.rope_theta,
            scaling=self.config.rope_scaling,
            device=block_embeds.device,
        )
        block_rope = rope_cos_sin(block_position_ids, inv_freq)  # 2 x [B, Q, D] float32
        context_rope = rope_cos_sin(context_position_ids, inv_freq)  # 2 x [B, T, D] float32
        x = block_embeds  # [B, Q, H]
        layer_outputs = []
        for layer, mask in zip(self.layers, masks, strict=True):
            x = layer(x, context, block_rope=block_rope, context_rope=context_rope, mask=mask)
            if return_layer_outputs:
                layer_outputs.append(x)
        return DrafterOutput(hidden=self.norm(x), context=context, layer_outputs=layer_outputs)

    # ----------------------------------------------------------------- inference (cached context)
    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, L, head_dim] float32 for integer positions [B, L], as `forward` uses them."""
        inv_freq = rope_inv_freq(
            head_dim=self.config.head_dim,
            theta=self.config.rope_theta,
            scaling=self.config.rope_scaling,
            device=position_ids.device,
        )
        return rope_cos_sin(position_ids, inv_freq)

    def context_kv(
        self, aux_hidden_states: torch.Tensor, *, context_position_ids: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values [B, Hkv, T, D] of context rows aux [B, T, K*Hv] at positions [B, T].

        What `forward` computes inside every layer for the context, split out so speculative
        decoding computes it ONCE per committed position and appends it to a cache: a row's
        key/value depend only on its own aux states and position (fc, hidden_norm, k_norm and
        RoPE are per row), never on the block or on later rows.
        """
        context = self.context_features(aux_hidden_states)  # [B, T, H]
        context_rope = self.rope(context_position_ids)
        return [layer.self_attn.context_kv(context, context_rope=context_rope) for layer in self.layers]

    def forward_cached(
        self,
        *,
        block_embeds: torch.Tensor,
        block_position_ids: torch.Tensor,
        context_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        masks: Sequence[AttentionMask | None],
    ) -> torch.Tensor:
        """The drafting pass over cached context keys/values: norm(x) after the last layer [B, Q, H].

        block_embeds [B, Q, H]; block_position_ids [B, Q]; context_kv: one (K, V) per layer from
        `context_kv` (concatenated along T as positions are committed); masks: one per layer over
        [context ; block] columns ([B, Q, T+Q] dense bool) or None (see DFlashAttention.forward_cached).
        Computes what `forward` computes for the same blocks and context rows.
        """
        if len(context_kv) != len(self.layers) or len(masks) != len(self.layers):
            raise ValueError(
                f"got {len(context_kv)} context k/v pairs and {len(masks)} masks for "
                f"{len(self.layers)} layers (one each per layer)"
            )
        block_rope = self.rope(block_position_ids)
        x = block_embeds
        for layer, (k, v), mask in zip(self.layers, context_kv, masks, strict=True):
            x = layer.forward_cached(x, context_k=k, context_v=v, block_rope=block_rope, mask=mask)
        return self.norm(x)

    def compile_layers(self) -> None:
        """torch.compile each decoder layer's forward, in place (CUDA training).

        Fuses the norms, RoPE, SiLU-gating and dtype casts around the matmuls and the flex kernel.
        Only `forward` is compiled: module hooks (FSDP's gathers) stay outside the graph, and
        parameter names (the checkpoint format) are unchanged.
        """
        for layer in self.layers:
            layer.forward = torch.compile(layer.forward)

    def compute_logits(self, hidden: torch.Tensor, *, verifier_lm_head: nn.Module) -> torch.Tensor:
        """[B, Q, H] -> [B, Q, D]: own frozen head with a reduced vocab, else the verifier's [.., V]."""
        head = self.lm_head if self.lm_head is not None else verifier_lm_head
        return head(hidden)

    # ----------------------------------------------------------------- draft vocab
    @torch.no_grad()
    def set_draft_vocab(
        self, *, d2t: torch.Tensor, t2d: torch.Tensor, verifier_lm_head: torch.Tensor
    ) -> None:
        """Install the draft vocab: d2t offsets [D], t2d mask [V], and lm_head = verifier rows i + d2t[i]."""
        if self.lm_head is None:
            raise ValueError("set_draft_vocab needs draft_vocab_size < vocab_size in the DrafterConfig")
        D, V = self.config.draft_vocab_size, self.config.vocab_size
        d2t = d2t.to(torch.long).cpu()
        t2d = t2d.to(torch.bool).cpu()
        if d2t.shape != (D,) or t2d.shape != (V,):
            raise ValueError(f"d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)}: expected ({D},) / ({V},)")
        target_ids = torch.arange(D) + d2t
        if (
            int(t2d.sum()) != D
            or not bool(t2d[target_ids.clamp(0, V - 1)].all())
            or target_ids.unique().numel() != D
        ):
            raise ValueError(
                "d2t and t2d disagree: d2t must map the D draft ids onto exactly the ids t2d marks"
            )
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        self.lm_head.weight.copy_(verifier_lm_head.detach()[target_ids.to(verifier_lm_head.device)])

    def draft_to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocab ids -> verifier ids (identity with the full vocab)."""
        if self.lm_head is None:
            return draft_ids
        return draft_ids + self.d2t[draft_ids]

    def target_to_draft_ids(self, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Verifier ids -> (draft ids, in_draft_vocab). Ids outside the draft vocab map to 0, flag False."""
        if self.lm_head is None:
            return target_ids, torch.ones_like(target_ids, dtype=torch.bool)
        D = self.config.draft_vocab_size
        lookup = torch.zeros(self.config.vocab_size, dtype=torch.long, device=target_ids.device)
        lookup[torch.arange(D, device=target_ids.device) + self.d2t] = torch.arange(
            D, device=target_ids.device
        )
        return lookup[target_ids], self.t2d[target_ids]
