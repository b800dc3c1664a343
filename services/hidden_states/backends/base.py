"""What a backend (a way of running the verifier) gives the service.

A backend is driven by one worker thread (`services.hidden_states.scheduler`), so it needs no
locking of its own. It captures a fixed list of layer ids chosen at start-up (`info.layer_ids`,
ascending, always including N); requests pick a subset of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from dflash_core.verifier import VerifierFingerprint


@dataclass(frozen=True)
class BackendInfo:
    name: Literal["transformers", "vllm"]
    fingerprint: VerifierFingerprint
    layer_ids: tuple[int, ...]  # ascending; the last is fingerprint.num_layers
    dtype: torch.dtype  # of the returned tensors (and so of the wire)
    max_length: int  # longest token list accepted
    max_batch_tokens: int  # tokens run in one forward
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class GeneratedSequence:
    token_ids: list[int]  # new tokens only, the stop token included when one ended it
    finish_reason: Literal["stop", "length"]


class Backend(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    def extract(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states of each token sequence ([t] int64): [t, len(info.layer_ids), H] in
        `info.dtype` on the CPU, in the order given. Layer id L is the residual stream entering
        decoder layer L; N is the last layer's output before the final norm (DESIGN 2.1)."""
        ...

    def generate(self, prompts: Sequence[list[int]], params: GenerationParams) -> list[GeneratedSequence]:
        """One completion per prompt, in order."""
        ...

    def close(self) -> None: ...


def served_layer_ids(target_layer_ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The layer ids a service captures: the requested ones and N, ascending, each once."""
    return tuple(sorted({*target_layer_ids, num_layers}))


# The service's --dtype flag: `auto` is bfloat16, the wire default (DESIGN 2.4).
SERVICE_DTYPES = {
    "auto": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
