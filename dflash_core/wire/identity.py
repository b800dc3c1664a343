"""Which verifier a service runs, as both ends of the wire see it (docs/architecture.md).

The trainer sends its own fingerprint as JSON under `EXPECT_VERIFIER_KEY` in the metadata of
every Extract call; the service refuses (FAILED_PRECONDITION) when it runs something else.
"""

from __future__ import annotations

from dflash_core.verifier import VerifierFingerprint
from dflash_core.wire.pb import hidden_states_pb2 as pb

EXPECT_VERIFIER_KEY = "dflash-expect-verifier"


def fingerprint_from_info(info: pb.ServiceInfo) -> VerifierFingerprint:
    """The verifier a service reports, in the trainer's terms."""
    return VerifierFingerprint(
        name_or_path=info.verifier_name_or_path,
        architecture=info.architecture,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        tokenizer_sha256=info.tokenizer_sha256,
    )
