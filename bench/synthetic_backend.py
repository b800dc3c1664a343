"""A hidden-state backend without a verifier: precomputed random bf16 planes, so a benchmark of
the service measures the wire and the service around it, not a forward pass.

    backend = SyntheticBackend(SyntheticShape(tokens=2048, planes=4, hidden=4096))
    HiddenStateServer(backend, port=0).start()

Both ends can rebuild the exact tensor a sample gets (`SyntheticShape.reference` from the same
seed, `expected_planes`), so a client checks what it received byte for byte. Samples differ: the
first token id picks the row the sample's slice starts at, so frames of two samples that got
mixed up would not compare equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dflash_core.verifier import VerifierFingerprint
from services.hidden_states.backends.base import (
    BackendInfo,
    GeneratedSequence,
    GenerationParams,
    per_prompt_params,
)

# Distinct start rows: enough that neighbouring sample ids get different tensors.
START_ROWS = 61


@dataclass(frozen=True)
class SyntheticShape:
    """What one sample weighs: [tokens, planes, hidden] in bf16 (planes = aux layers + N)."""

    tokens: int = 2048
    planes: int = 4
    hidden: int = 4096
    num_layers: int = 36  # Qwen3-8B
    vocab_size: int = 151_936  # Qwen3
    seed: int = 0

    @property
    def sample_bytes(self) -> int:
        return self.tokens * self.planes * self.hidden * 2

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """`planes - 1` auxiliary layers spread over the stack, then N (docs/architecture.md)."""
        aux = self.planes - 1
        step = self.num_layers // (aux + 1)
        return (*(1 + step * i for i in range(aux)), self.num_layers)

    def reference(self) -> torch.Tensor:
        """[tokens + START_ROWS, planes, hidden] bf16, the same in every process for one seed."""
        generator = torch.Generator().manual_seed(self.seed)
        rows = self.tokens + START_ROWS
        return torch.randn(rows, self.planes, self.hidden, generator=generator).to(torch.bfloat16)


def sample_token_ids(sample_id: int, shape: SyntheticShape) -> torch.Tensor:
    """The token ids a client sends for `sample_id`: [tokens] int64 inside the vocabulary."""
    return (torch.arange(shape.tokens, dtype=torch.int64) + sample_id) % shape.vocab_size


def expected_planes(reference: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """What the backend returns for `token_ids`: a contiguous [t, planes, hidden] view, no copy."""
    start = int(token_ids[0]) % START_ROWS
    return reference[start : start + token_ids.numel()]


class SyntheticBackend:
    """Satisfies `services.hidden_states.backends.base.Backend`; extract costs nothing."""

    def __init__(self, shape: SyntheticShape) -> None:
        self.shape = shape
        self._reference = shape.reference()
        self._info = BackendInfo(
            # The protocol only knows the two real backends; the wire does not care which.
            name="transformers",
            fingerprint=VerifierFingerprint(
                name_or_path="synthetic/qwen3-8b-shape",
                architecture="SyntheticForBenchmark",
                num_layers=shape.num_layers,
                hidden_size=shape.hidden,
                vocab_size=shape.vocab_size,
                tokenizer_sha256=hashlib.sha256(b"synthetic benchmark tokenizer").hexdigest(),
            ),
            layer_ids=shape.layer_ids,
            dtype=torch.bfloat16,
            max_length=shape.tokens,
            max_batch_tokens=4 * shape.tokens,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def extract(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [expected_planes(self._reference, ids) for ids in sequences]

    def generate(
        self, prompts: Sequence[list[int]], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[GeneratedSequence]:
        # Regeneration is not part of any transport figure; a fixed answer keeps the protocol whole.
        return [
            GeneratedSequence(token_ids=[0] * own.max_new_tokens, finish_reason="length")
            for own in per_prompt_params(params, len(prompts))
        ]

    def close(self) -> None:
        pass
