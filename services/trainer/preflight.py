"""Checks that run before the first step and refuse to start, naming both sides, on a mismatch.

Every peer system trains happily on data tokenized by another tokenizer, or on hidden states
of another verifier, and ships a drafter that accepts ~1.0 tokens. These checks make that loud.
"""

from __future__ import annotations

from pathlib import Path

from dflash_core.data.metadata import PreparedMetadata
from dflash_core.verifier import VerifierFingerprint


class PreflightError(RuntimeError):
    """The run would train on mismatched parts; the message says which and how to fix it."""


def check_data_matches_verifier(
    data_meta: PreparedMetadata, fingerprint: VerifierFingerprint, *, data_path: Path
) -> None:
    """The prepared data must come from the verifier's own tokenizer and chat template (a
    dflash_data.json without a fingerprint is refused when it is read: load_prepared)."""
    data_tokenizer = data_meta.tokenizer_fingerprint
    if data_tokenizer != fingerprint.tokenizer_sha256:
        raise PreflightError(
            "the training data was tokenized with a different tokenizer than the verifier's:\n"
            f"  data     {data_path}: model {data_meta.model!r}, tokenizer {data_tokenizer[:16]}\n"
            f"  verifier {fingerprint.name_or_path!r}: tokenizer {fingerprint.tokenizer_sha256[:16]}\n"
            f"re-run `dflash prepare-data --model {fingerprint.name_or_path}` or train against "
            f"--verifier-name-or-path {data_meta.model}"
        )
