"""The verifier fingerprint: what must agree between the trainer, the hidden-state service and the data.

Name, architecture, decoder layers, hidden size, vocab size and a digest of the tokenizer with its
chat template (docs/architecture.md). Sides compare fingerprints before any work, and a mismatch names every
differing field with both sides' values (`VerifierFingerprint.mismatches`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from dflash_core.verifier.loading import text_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over what decides token ids and rendered chats: vocab, merges, special tokens, template.

    Built from sorted JSON, never from Python `hash()` or object reprs, so two processes (and a
    tokenizer saved and loaded again) give the same digest.
    """
    vocab = tokenizer.get_vocab()
    merges: list[str] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model_json = json.loads(backend.to_str()).get("model", {})
        # tokenizers writes merges as "a b" strings in old files and as [a, b] pairs in new ones.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges") or []]
    special = {
        "special_tokens_map": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added_tokens": sorted(
            (int(i), t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()
        ),
    }
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "merges": merges,
        "special": special,
        "chat_template": tokenizer.chat_template,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerifierFingerprint(BaseModel):
    """What must agree between the trainer, the hidden-state service and the data (docs/architecture.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name_or_path: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tokenizer_sha256: str

    def mismatches(
        self, other: VerifierFingerprint, *, this_side: str = "expected", other_side: str = "served"
    ) -> list[str]:
        """One human-readable line per differing field, naming both sides; empty when they agree.

        Names are compared after normalising local paths, so `./m/` and `m` agree; a hub id and a
        local copy of it differ by name (the other fields still say whether the weights agree).
        """
        problems = []
        ours, theirs = f"{this_side} {self.name_or_path!r}", f"{other_side} {other.name_or_path!r}"
        if _normalise_name(self.name_or_path) != _normalise_name(other.name_or_path):
            problems.append(
                f"verifier name: {this_side} {self.name_or_path!r} vs {other_side} {other.name_or_path!r}"
            )
        for field, label in (
            ("architecture", "architecture"),
            ("num_layers", "decoder layers"),
            ("hidden_size", "hidden size"),
            ("vocab_size", "vocab size"),
        ):
            mine, yours = getattr(self, field), getattr(other, field)
            if mine != yours:
                problems.append(f"{label}: {mine!r} ({ours}) vs {yours!r} ({theirs})")
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            problems.append(
                f"tokenizer/chat template fingerprint: {self.tokenizer_sha256[:16]} ({ours}) vs "
                f"{other.tokenizer_sha256[:16]} ({theirs})"
            )
        return problems


def _normalise_name(name: str) -> str:
    path = Path(name)
    if path.exists():
        return str(path.resolve())
    return name.rstrip("/")


def fingerprint_of(
    model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, *, name_or_path: str | None = None
) -> VerifierFingerprint:
    """Fingerprint of a loaded verifier (`name_or_path` defaults to the config's own)."""
    text = text_config(model_config)
    architectures = getattr(model_config, "architectures", None) or []
    return VerifierFingerprint(
        name_or_path=name_or_path or getattr(model_config, "name_or_path", "") or "",
        architecture=architectures[0] if architectures else str(getattr(text, "model_type", "unknown")),
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
    )
