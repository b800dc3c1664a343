"""A generation-only backend whose engine costs nothing: the Generate path without a GPU.

    backend = SyntheticGenerateBackend(SyntheticEngine(max_num_seqs=1024, step_s=0.008))
    HiddenStateServer(backend, port=0).start()

Its `generation_stream` behaves like vLLM's continuous batching as the scheduler sees it: each
`step()` gives every running prompt one token, at most `max_num_seqs` prompts run at once and the
rest wait in arrival order, a prompt joins the batch in the step that admits it (its first token
comes with its prefill). Replies are deterministic per prompt: a natural length drawn uniformly
from `lengths` (seeded by the prompt's ids, so arrival order does not matter) that ends with the
first eos id, cut by `max_new_tokens` ("length") or by a stop id met earlier ("stop"), the stop
token kept, as vLLM returns it.

Time: with `step_s` > 0 the engine steps on its own clock, one step every `step_s`, as vLLM's
engine-core process does whatever the process that reads its outputs is busy with; `step()`
sleeps (GIL released) until the next step is done and returns what finished in every step since
the last call. A clock that finds nothing to run stops, and starts again with the next prompt.
`step_s` = 0: each call runs exactly one step. What vLLM's front end costs in the service's
process can be added as GIL-held busy work: `frontend_us_per_seq` per running prompt per step
(its output processing) and `add_us` per prompt added (input processing, the send to the core).

Bookkeeping is O(prompts finished) per step (prompts are bucketed by the step they end in), so
the engine's own Python cost stays out of the figure; `stats` counts steps, tokens and how full
the batch was.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from array import array
from collections import deque
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

VOCAB_SIZE = 49_152  # SmolLM2
EOS_TOKEN_ID = 2  # SmolLM2's <|im_end|>
FIRST_ORDINARY_ID = 3  # ids below are special; generated tokens avoid them unless they end a reply


def synthetic_reply(
    prompt: Sequence[int],
    params: GenerationParams,
    *,
    lengths: tuple[int, int],
    eos_token_ids: Sequence[int],
    seed: int = 0,
) -> GeneratedSequence:
    """What the synthetic engine answers to `prompt` (see the module docstring)."""
    digest = zlib.crc32(array("q", prompt).tobytes(), seed)
    low, high = lengths
    natural = low + digest % (high - low + 1)
    span = VOCAB_SIZE - FIRST_ORDINARY_ID
    tokens = [FIRST_ORDINARY_ID + (digest + 7919 * i) % span for i in range(natural)]
    if eos_token_ids:
        tokens[-1] = eos_token_ids[0]
    stops = {*eos_token_ids, *params.stop_token_ids}
    for index, token in enumerate(tokens[: params.max_new_tokens]):
        if token in stops:
            return GeneratedSequence(token_ids=tokens[: index + 1], finish_reason="stop")
    return GeneratedSequence(token_ids=tokens[: params.max_new_tokens], finish_reason="length")


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # generated, one per running prompt per step
    finished: int = 0
    aborted: int = 0
    full_steps: int = 0  # steps that ran max_num_seqs prompts

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class SyntheticEngine:
    """`base.GenerationStream` with continuous batching and no compute (module docstring)."""

    def __init__(
        self,
        *,
        max_num_seqs: int = 1024,
        step_s: float = 0.0,
        lengths: tuple[int, int] = (20, 192),
        eos_token_ids: tuple[int, ...] = (EOS_TOKEN_ID,),
        max_model_len: int = 4096,
        seed: int = 0,
        frontend_us_per_seq: float = 0.0,
        add_us: float = 0.0,
    ) -> None:
        self.max_num_seqs, self.step_s = max_num_seqs, step_s
        self.frontend_us_per_seq, self.add_us = frontend_us_per_seq, add_us
        self._clock: float | None = None  # when the last step the front end saw ended
        self.lengths, self.eos_token_ids = lengths, eos_token_ids
        self.max_model_len, self.seed = max_model_len, seed
        self.stats = EngineStats()
        self._waiting: deque[str] = deque()
        self._replies: dict[str, GeneratedSequence] = {}  # every prompt added, not finished or aborted
        self._running: set[str] = set()
        self._ends: dict[int, list[str]] = {}  # step -> keys whose last token comes in it

    @property
    def unfinished(self) -> int:
        return len(self._replies)

    def add(self, key: str, prompt: list[int], params: GenerationParams) -> None:
        if not prompt or len(prompt) + params.max_new_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len}")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} must be >= 1")
        self._replies[key] = synthetic_reply(
            prompt, params, lengths=self.lengths, eos_token_ids=self.eos_token_ids, seed=self.seed
        )
        self._waiting.append(key)
        _busy(self.add_us)

    def step(self) -> list[tuple[str, GeneratedSequence]]:
        steps = 1
        if self.step_s > 0:
            now = time.perf_counter()
            if self._clock is None:  # the engine was idle: its first step starts now
                self._clock = now
            if now < self._clock + self.step_s:
                time.sleep(self._clock + self.step_s - now)
                now = time.perf_counter()
            # Steps that ended while the front end was busy elsewhere; prompts it added meanwhile
            # join the first of them (a little early: the core saw them as they were sent).
            steps = max(1, int((now - self._clock) / self.step_s))
            self._clock += steps * self.step_s
        finished: list[tuple[str, GeneratedSequence]] = []
        tokens = self.stats.tokens
        for _ in range(steps):
            finished += self._one_step()
            if not self._replies:
                self._clock = None
                break
        # One output per running prompt per step reaches the front end.
        _busy(self.frontend_us_per_seq * (self.stats.tokens - tokens))
        return finished

    def _one_step(self) -> list[tuple[str, GeneratedSequence]]:
        stats = self.stats
        stats.steps += 1
        step = stats.steps
        while self._waiting and len(self._running) < self.max_num_seqs:
            key = self._waiting.popleft()
            reply = self._replies.get(key)
            if reply is None:
                continue  # aborted while waiting
            self._running.add(key)
            self._ends.setdefault(step + len(reply.token_ids) - 1, []).append(key)
        stats.tokens += len(self._running)
        stats.full_steps += len(self._running) == self.max_num_seqs
        finished = []
        for key in self._ends.pop(step, ()):
            if key in self._running:
                self._running.discard(key)
                finished.append((key, self._replies.pop(key)))
        stats.finished += len(finished)
        return finished

    def abort(self, keys: Sequence[str]) -> None:
        for key in keys:
            if self._replies.pop(key, None) is not None:
                self._running.discard(key)
                self.stats.aborted += 1
        if not self._replies:
            self._clock = None


def _busy(microseconds: float) -> None:
    """Hold the GIL for `microseconds`, as Python code of that cost would."""
    if microseconds <= 0:
        return
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


class SyntheticGenerateBackend:
    """A `--generate-only` backend around `SyntheticEngine`, reporting itself as vLLM so clients
    use their vLLM defaults (512 prompts a call, 4 calls in flight)."""

    def __init__(self, engine: SyntheticEngine) -> None:
        self.generation_stream = engine
        self._info = BackendInfo(
            name="vllm",
            fingerprint=VerifierFingerprint(
                name_or_path="synthetic/generate-path",
                architecture="SyntheticForBenchmark",
                num_layers=30,
                hidden_size=576,
                vocab_size=VOCAB_SIZE,
                tokenizer_sha256=hashlib.sha256(b"synthetic benchmark tokenizer").hexdigest(),
            ),
            layer_ids=(30,),
            dtype=torch.bfloat16,
            max_length=engine.max_model_len - 1,
            max_batch_tokens=8192,
            eos_token_ids=engine.eos_token_ids,
            generate_only=True,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def extract(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("generation only")

    def generate(
        self, prompts: Sequence[list[int]], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[GeneratedSequence]:
        engine = self.generation_stream
        settings = dict(lengths=engine.lengths, eos_token_ids=engine.eos_token_ids, seed=engine.seed)
        return [
            synthetic_reply(prompt, own, **settings)  # type: ignore[arg-type]
            for prompt, own in zip(prompts, per_prompt_params(params, len(prompts)), strict=True)
        ]

    def close(self) -> None:
        pass
