"""The verifier generating in this process, behind the `GenerateClient` surface prepare-data uses.

`dflash prepare-data --data self` (and `--regenerate-with in-process`) needs no service: the
transformers backend runs here. It is the very backend `dflash serve-hidden-states` runs, driven
with the same per-prompt seeds (`seed + i` for the i-th prompt of a call) and the same stop-token
handling, so a service on the same verifier and dtype gives the same rows.

`batch_size` > 1 trades that equality for throughput (a CPU demo): prompts then go through
`dflash_core.generation.batched_generate`, reproducible but not equal to one-by-one generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from dflash_core.generation import batched_generate
from dflash_core.wire.pb import hidden_states_pb2 as pb
from services.hidden_states.backends.base import SERVICE_DTYPES, GenerationParams
from services.hidden_states.backends.transformers_backend import TransformersBackend
from services.hidden_states.generate_client import reply_tokens
from services.hidden_states.servicer import service_info

__all__ = ["InProcessGenerator"]

ADDRESS = "in-process"


class InProcessGenerator:
    def __init__(self, backend: TransformersBackend, *, batch_size: int = 1) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.info: pb.ServiceInfo = service_info(backend.info, max_frame_bytes=0)

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 8192,
        batch_size: int = 1,
    ) -> InProcessGenerator:
        """Load `model` as the service would (`--dtype auto` is bfloat16, the service's default)."""
        backend = TransformersBackend.load(
            model, target_layer_ids=None, dtype=SERVICE_DTYPES[dtype], device=device, max_length=max_length
        )
        return cls(backend, batch_size=batch_size)

    @property
    def addresses(self) -> list[str]:
        return [ADDRESS]

    @property
    def max_length(self) -> int:
        return self.info.max_length

    @property
    def calls_in_flight(self) -> int:
        return 1  # one call at a time: the caller's own thread runs the model

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """One reply per prompt, in order, the stop token removed (as `GenerateClient.complete`)."""
        for index, prompt in enumerate(prompts):
            if not prompt or len(prompt) + max_new_tokens > self.max_length:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; with {max_new_tokens} new tokens it must "
                    f"fit in {self.max_length}"
                )
        if self.batch_size > 1:
            return self._batched(
                prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                stop_token_ids=stop_token_ids,
            )  # fmt: skip
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=tuple(stop_token_ids),
        )
        generated = self.backend.generate([list(p) for p in prompts], params)
        return [reply_tokens(g.token_ids, g.finish_reason) for g in generated]

    def _batched(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        stop_token_ids: Sequence[int],
    ) -> list[list[int]]:
        stops = list(dict.fromkeys([*self.backend.info.eos_token_ids, *stop_token_ids]))
        pad = self.backend.tokenizer.pad_token_id
        return batched_generate(
            self.backend.model,
            prompts,
            stop_ids=stops,
            pad_id=pad if pad is not None else stops[0],
            max_new_tokens=max_new_tokens,
            max_batch=self.batch_size,
            max_batch_tokens=self.batch_size * (max(map(len, prompts), default=0) + max_new_tokens),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> InProcessGenerator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
