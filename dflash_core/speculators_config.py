"""config.json of a DFlash checkpoint in the speculators layout <-> `DrafterConfig`.

What the keys mean to vLLM and speculators is a contract (docs/architecture.md, "Checkpoint
format"). Invariants of what this module writes:
- `aux_hidden_state_layer_ids` in our convention, UNSHIFTED (vLLM shifts them itself);
- `sliding_window_non_causal` always written, and `true` when every layer is full attention, so
  vLLM serves the in-block causality the drafter was trained with;
- `mask_token_id` always set (vLLM fills block slots 1..B-1 with it);
- no `auto_map` (vLLM parses the config without remote code).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from typing import Any

import torch

from dflash_core.model.config import DrafterConfig

logger = logging.getLogger(__name__)

# The speculators release whose format (and test vectors) we follow.
SPECULATORS_VERSION = "0.9.0"
DRAFTER_ARCHITECTURE = "DFlashDraftModel"


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _served_non_causal(cfg: DrafterConfig) -> bool:
    """The `sliding_window_non_causal` value that makes vLLM reproduce what we trained.

    vLLM's speculators converter turns the flag into a global `dflash_config.causal` override
    (0.32: causal = not flag; newer releases only force non-causal when it is true); without one,
    sliding layers are causal and full layers are not. So all-full drafters get `true` (a `false`
    would be served causal by 0.32 although trained bidirectional), and the flag is always written
    because vLLM and speculators default it differently when it is absent.
    """
    sliding = [t == "sliding_attention" for t in cfg.layer_types]
    if not any(sliding):
        if not cfg.sliding_window_non_causal:
            logger.info(
                "all draft layers are full attention, which trains bidirectionally in-block; writing "
                "sliding_window_non_causal: true so vLLM serves them bidirectionally too"
            )
        return True
    if not all(sliding) and not cfg.sliding_window_non_causal:
        logger.warning(
            "draft layers mix full and sliding attention with causal sliding layers: vLLM's V1 runner "
            "refuses mixed drafters, and vLLM releases that read sliding_window_non_causal: false as a "
            "global causal switch would also make the full layers causal (they trained bidirectional)"
        )
    return cfg.sliding_window_non_causal


def _max_window_layers(layer_types: list[str]) -> int:
    """Qwen3's legacy knob: layers >= this index slide. Only meaningful for readers that ignore
    `layer_types` (we always write `layer_types`, which wins)."""
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if sliding and sliding == list(range(sliding[0], len(layer_types))):
        return sliding[0]
    return len(layer_types)


def drafter_config_to_speculators(
    cfg: DrafterConfig, *, dtype: torch.dtype | str = "float32"
) -> dict[str, Any]:
    """The speculators `config.json` dict for `cfg` (every key speculators 0.9.0 writes but `auto_map`,
    which points at a copy of speculators' config class: vLLM parses the config without remote code).

    `dtype` names the dtype the weights are stored in.
    """
    any_sliding = "sliding_attention" in cfg.layer_types
    scaling = dict(cfg.rope_scaling or {})
    rope_parameters: dict[str, Any] = {
        "rope_theta": float(cfg.rope_theta),
        "rope_type": scaling.get("rope_type") or scaling.get("type") or "default",
        **{k: v for k, v in scaling.items() if k not in ("rope_theta", "rope_type", "type")},
    }
    layer_config: dict[str, Any] = {
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_parameters,
        # Older transformers/vLLM read the base from here rather than from rope_parameters.
        "rope_theta": float(cfg.rope_theta),
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_types": list(cfg.layer_types),
        "sliding_window": cfg.sliding_window if any_sliding else None,
        "use_sliding_window": any_sliding,
        "max_window_layers": _max_window_layers(list(cfg.layer_types)),
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    return {
        "architectures": [DRAFTER_ARCHITECTURE],
        "speculators_model_type": "dflash",
        "speculators_version": SPECULATORS_VERSION,
        "aux_hidden_state_layer_ids": list(cfg.aux_hidden_state_layer_ids),
        "block_size": cfg.block_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "mask_token_id": cfg.mask_token_id,
        "target_hidden_size": cfg.target_hidden_size,
        # Our drafter's slot 0 is the anchor (the bonus token) and drafts B-1 tokens, which is
        # what vLLM's DFlash proposer assumes.
        "sample_from_anchor": False,
        "sliding_window_non_causal": _served_non_causal(cfg),
        "tie_word_embeddings": False,
        "dtype": _dtype_name(dtype),
        "transformers_version": _package_version("transformers"),
        "transformer_layer_config": layer_config,
        "speculators_config": {
            "algorithm": "dflash",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": cfg.block_size - 1,
                    "accept_tolerance": 0.0,
                    "verifier_accept_k": 1,
                }
            ],
            "verifier": {
                "name_or_path": cfg.verifier_name_or_path,
                "architectures": list(cfg.verifier_architectures),
            },
        },
    }


def _rope_from_layer_config(layer: Mapping[str, Any]) -> tuple[float, dict | None]:
    params = dict(layer.get("rope_parameters") or {})
    if not params and layer.get("rope_scaling"):
        params = dict(layer["rope_scaling"])
    theta = params.pop("rope_theta", None) or layer.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    extras = {k: v for k, v in params.items() if k != "rope_type"}
    if rope_type == "default" and not extras:
        return float(theta), None
    return float(theta), params


def drafter_config_from_speculators(d: Mapping[str, Any]) -> DrafterConfig:
    """Parse a speculators DFlash `config.json` dict (ours, speculators' or a converted z-lab one).

    Keys a file lacks get speculators' defaults, each with a log line.
    """
    model_type = d.get("speculators_model_type")
    if model_type != "dflash":
        raise ValueError(f"not a DFlash speculators config: speculators_model_type is {model_type!r}")
    if d.get("sample_from_anchor"):
        raise ValueError(
            "this checkpoint was trained with sample_from_anchor: true (slot 0 drafts too); this "
            "trainer only handles the DFlash layout where slot 0 is the anchor"
        )
    layer = d.get("transformer_layer_config")
    if not isinstance(layer, Mapping):
        raise ValueError("config.json has no transformer_layer_config object")
    num_layers = int(layer["num_hidden_layers"])
    layer_types = layer.get("layer_types")
    if not layer_types:
        # Qwen3Config's rule when layer_types is absent.
        window_from = layer.get("max_window_layers", num_layers)
        use_sliding = bool(layer.get("use_sliding_window")) and layer.get("sliding_window") is not None
        layer_types = [
            "sliding_attention" if use_sliding and i >= window_from else "full_attention"
            for i in range(num_layers)
        ]
        logger.info(
            "config.json has no layer_types; derived %s from use_sliding_window/max_window_layers",
            layer_types,
        )
    if "sliding_window_non_causal" in d:
        non_causal = bool(d["sliding_window_non_causal"])
    else:
        non_causal = False
        logger.info("config.json has no sliding_window_non_causal; using speculators' default false")
    spec = d.get("speculators_config") or {}
    verifier = spec.get("verifier") or {}
    methods = spec.get("proposal_methods") or []
    block_size = int(d.get("block_size") or 8)
    if "block_size" not in d:
        logger.info("config.json has no block_size; using speculators' default 8")
    if methods and methods[0].get("speculative_tokens") not in (None, block_size - 1):
        logger.warning(
            "speculative_tokens %s != block_size - 1 = %d; vLLM would default to drafting %s tokens",
            methods[0].get("speculative_tokens"),
            block_size - 1,
            methods[0].get("speculative_tokens"),
        )
    if d.get("mask_token_id") is None:
        raise ValueError("config.json has no mask_token_id; vLLM needs it to fill the draft block")
    theta, rope_scaling = _rope_from_layer_config(layer)
    vocab_size = int(layer["vocab_size"])
    return DrafterConfig(
        hidden_size=int(layer["hidden_size"]),
        intermediate_size=int(layer["intermediate_size"]),
        num_hidden_layers=num_layers,
        num_attention_heads=int(layer["num_attention_heads"]),
        num_key_value_heads=int(layer.get("num_key_value_heads") or layer["num_attention_heads"]),
        head_dim=int(layer.get("head_dim") or int(layer["hidden_size"]) // int(layer["num_attention_heads"])),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(layer.get("max_position_embeddings", 32768)),
        hidden_act=layer.get("hidden_act", "silu"),
        layer_types=list(layer_types),
        sliding_window=layer.get("sliding_window") if "sliding_attention" in layer_types else None,
        sliding_window_non_causal=non_causal,
        block_size=block_size,
        aux_hidden_state_layer_ids=[int(i) for i in d["aux_hidden_state_layer_ids"]],
        mask_token_id=int(d["mask_token_id"]),
        vocab_size=vocab_size,
        draft_vocab_size=int(d.get("draft_vocab_size") or vocab_size),
        target_hidden_size=d.get("target_hidden_size"),
        verifier_name_or_path=str(verifier.get("name_or_path") or ""),
        verifier_architectures=list(verifier.get("architectures") or []),
    )
