"""The verifier side: resolving its name, loading it, fingerprinting it, its layer ids, mask token and heads.

One job per module; this package re-exports the names the rest of the code base imports:

    names        what a verifier name points at (HF id, folder, .gguf, the embedded SmolLM2)
    loading      tokenizer, config, or the whole frozen model, through transformers
    fingerprint  what must agree between trainer, hidden-state service and data
    layer_ids    the layer-id convention of docs/architecture.md: default target layers and their check
    mask_token   the id that fills block slots 1..B-1
    heads        embedding, final norm and LM head, borrowed by the drafter
"""

from __future__ import annotations

from dflash_core.verifier.fingerprint import VerifierFingerprint, fingerprint_of, tokenizer_fingerprint
from dflash_core.verifier.heads import load_verifier_heads, load_verifier_heads_from_model
from dflash_core.verifier.layer_ids import default_target_layer_ids, validate_target_layer_ids
from dflash_core.verifier.loading import (
    SMOLLM2_CHAT_TEMPLATE,
    load_tokenizer,
    load_verifier,
    load_verifier_config,
    transformers_folder,
)
from dflash_core.verifier.mask_token import resolve_mask_token_id
from dflash_core.verifier.names import EMBEDDED_GGUF_FILE, EMBEDDED_PACKAGE, embedded_gguf_path

__all__ = [
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_PACKAGE",
    "SMOLLM2_CHAT_TEMPLATE",
    "VerifierFingerprint",
    "default_target_layer_ids",
    "embedded_gguf_path",
    "fingerprint_of",
    "load_tokenizer",
    "load_verifier",
    "load_verifier_config",
    "load_verifier_heads",
    "load_verifier_heads_from_model",
    "resolve_mask_token_id",
    "tokenizer_fingerprint",
    "transformers_folder",
    "validate_target_layer_ids",
]
