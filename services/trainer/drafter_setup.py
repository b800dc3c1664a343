"""Derives the drafter's architecture from the verifier and the job, and sets up its draft vocab.

The drafter copies the verifier's layer geometry (hidden size, heads, head_dim, MLP width, RoPE)
so the verifier's embedding and LM head plug straight in, and so vLLM's DFlash proposer (which
builds its layers from `transformer_layer_config`) computes exactly what we trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dflash_core.config import TrainConfig
from dflash_core.data.prepare import load_token_freq
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.verifier import default_target_layer_ids, resolve_mask_token_id, validate_target_layer_ids
from dflash_core.vocab import build_draft_vocab

logger = logging.getLogger(__name__)


def _rope_theta(verifier_config) -> tuple[float, dict | None]:
    """RoPE base and scaling extras, from the old (`rope_theta`) or the new (`rope_parameters`) keys."""
    params = dict(getattr(verifier_config, "rope_parameters", None) or {})
    scaling = getattr(verifier_config, "rope_scaling", None)
    if scaling and not params:
        params = dict(scaling)
    theta = params.pop("rope_theta", None) or getattr(verifier_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    return float(theta), (params if rope_type != "default" else None)


def build_drafter_config(config: TrainConfig, *, verifier_config, tokenizer) -> DrafterConfig:
    """The drafter for this job. Layer ids are checked against the verifier here (0..N allowed)."""
    num_layers = verifier_config.num_hidden_layers
    layer_ids = config.target_layer_ids or default_target_layer_ids(num_layers)
    validate_target_layer_ids(layer_ids, num_layers)
    heads = verifier_config.num_attention_heads
    head_dim = getattr(verifier_config, "head_dim", None) or verifier_config.hidden_size // heads
    theta, rope_scaling = _rope_theta(verifier_config)
    vocab_size = verifier_config.vocab_size
    layer_type = "full_attention" if config.full_attention else "sliding_attention"
    return DrafterConfig(
        hidden_size=verifier_config.hidden_size,
        intermediate_size=verifier_config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(verifier_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=getattr(verifier_config, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=getattr(verifier_config, "max_position_embeddings", 32768),
        layer_types=[layer_type] * config.num_layers,
        sliding_window=config.sliding_window,
        # Written to config.json: vLLM derives in-block causality from this flag alone, so it must
        # say what we trained (bidirectional for full attention) or acceptance collapses silently.
        sliding_window_non_causal=config.full_attention,
        block_size=config.block_size,
        aux_hidden_state_layer_ids=list(layer_ids),
        mask_token_id=resolve_mask_token_id(tokenizer, vocab_size, config.mask_token_id),
        vocab_size=vocab_size,
        draft_vocab_size=config.draft_vocab_size or vocab_size,
        verifier_name_or_path=config.verifier_name_or_path,
        verifier_architectures=list(getattr(verifier_config, "architectures", None) or []),
    )


def init_reduced_vocab(drafter: DFlashDrafter, *, heads: VerifierHeads, data_path: Path) -> None:
    """Pick the draft vocab from the data's target-token counts and copy those LM-head rows."""
    token_freq = load_token_freq(data_path)
    # Embedding rows past the tokenizer (Qwen3 has ~270) are never targets: they count as zero.
    config = drafter.config
    vocab = build_draft_vocab(token_freq, config.draft_vocab_size, vocab_size=config.vocab_size)
    drafter.set_draft_vocab(d2t=vocab.d2t, t2d=vocab.t2d, verifier_lm_head=heads.lm_head.weight)
    covered = token_freq[vocab.t2d[: token_freq.numel()]].sum() / token_freq.sum().clamp(min=1)
    logger.info(
        "draft vocab: %d of %d tokens, covering %.1f%% of training targets",
        drafter.config.draft_vocab_size,
        drafter.config.vocab_size,
        100 * float(covered),
    )
