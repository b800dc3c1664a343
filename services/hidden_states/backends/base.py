"""What a backend (a way of running the verifier) gives the service.

A backend is driven by one worker thread (`services.hidden_states.scheduler`), so it needs no
locking of its own. It captures a fixed list of layer ids chosen at start-up (`info.layer_ids`,
ascending, always including N); requests pick a subset of them. A backend started for generation
only (`info.generate_only`, `serve-hidden-states --generate-only`) captures nothing, and the
service refuses Extract.

Generation takes one `GenerationParams` per prompt (`per_prompt_params` expands a request's),
so the scheduler can hand the prompts of several Generate calls to one `generate`. A backend
whose engine batches continuously may also offer a `GenerationStream` (`generation_stream`):
prompts join the running batch whenever they arrive and finish one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
    generate_only: bool = False  # no hidden states: Extract is refused (--generate-only)
    engine_replicas: int = 1  # generation engines side by side (--engine-replicas)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0  # of a request: its prompt i samples with seed + i (`per_prompt_params`)
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
        decoder layer L; N is the last layer's output before the final norm (docs/architecture.md)."""
        ...

    def generate(
        self, prompts: Sequence[list[int]], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[GeneratedSequence]:
        """One completion per prompt, in order. One `params` for all: prompt i samples with seed
        `params.seed + i`; a sequence: `params[i]` for prompt i, its seed as given."""
        ...

    def close(self) -> None: ...


class GenerationStream(Protocol):
    """Continuous generation: prompts added at any time join the batch the engine is running.

    Driven by the scheduler's worker alone, like the backend. A backend offers one as its
    `generation_stream` attribute (None or absent: the scheduler calls `generate`).
    """

    def add(self, key: str, prompt: list[int], params: GenerationParams) -> None:
        """Start generating for `prompt` (seed as given); `key` names it in `step`'s results.
        Raises ValueError for a prompt the engine cannot take (nothing is then added)."""
        ...

    def step(self) -> list[tuple[str, GeneratedSequence]]:
        """Run the engine one step; the (key, completion) of every prompt that finished in it."""
        ...

    def abort(self, keys: Sequence[str]) -> None:
        """Stop generating for these keys (their callers are gone); unknown keys are ignored."""
        ...

    @property
    def unfinished(self) -> int:
        """Prompts added and neither finished nor aborted."""
        ...


def per_prompt_params(
    params: GenerationParams | Sequence[GenerationParams], count: int
) -> list[GenerationParams]:
    """One `GenerationParams` per prompt: a request's params give prompt i the seed `seed + i`
    (both backends seed a request's prompts so), a sequence is taken as it is."""
    if isinstance(params, GenerationParams):
        return [replace(params, seed=params.seed + i) for i in range(count)]
    if len(params) != count:
        raise ValueError(f"{len(params)} generation params for {count} prompts")
    return list(params)


def served_layer_ids(target_layer_ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The layer ids a service captures: the requested ones and N, ascending, each once."""
    return tuple(sorted({*target_layer_ids, num_layers}))


# The service's --dtype flag: `auto` is bfloat16, the wire default (docs/architecture.md).
SERVICE_DTYPES = {
    "auto": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
