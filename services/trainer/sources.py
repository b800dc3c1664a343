"""Where the trainer gets the verifier's hidden states: the `HiddenStateSource` interface.

A source turns token ids into the two planes the DFlash objective needs, per sample:
`aux` [t, K*H] (the `--target-layer-ids`, concatenated on the feature axis in the order given)
and `last` [t, H] (layer N, the last decoder layer's output BEFORE the final norm; docs/architecture.md).

Implementations: `InProcessSource` (runs the verifier with transformers inside the trainer) here,
`GrpcSource` (the hidden-state service's client, `grpc_source.py`) and `CachingSource` (a local
store in front of either, `cache.py`); the trainer never knows which one it talks to.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dflash_core.capture import capture_sequences
from dflash_core.verifier import VerifierFingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRequest:
    sample_id: int
    input_ids: torch.Tensor  # [t] int64


@dataclass
class SampleHiddenStates:
    sample_id: int
    aux: torch.Tensor  # [t, K*H]
    last: torch.Tensor  # [t, H]


class HiddenStateSource(Protocol):
    """Everything the trainer needs from a verifier."""

    @property
    def fingerprint(self) -> VerifierFingerprint: ...

    @property
    def target_layer_ids(self) -> list[int]: ...

    def extract(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        """Hidden states for each request, returned in request order."""
        ...

    def prefetch(self, requests: Sequence[SampleRequest]) -> None:
        """A hint: these will be extracted soon. Remote sources start moving them; the in-process
        one computes them together with the next step that misses."""
        ...

    def close(self) -> None: ...


class InProcessSource:
    """Runs the verifier with transformers in this process (CPU or the trainer's GPU), ahead of need.

    Why it computes ahead: on an H200, computing each step on its own made the fetch phase 0.196 s
    per step against 0.058 s of drafter forward and backward. One step (a packed row of 8192
    tokens, ~17 samples) took 4-5 eager HF forwards of the 30-layer verifier, each with a large
    fixed Python cost. So `prefetch` records what the next steps will ask for, and a step that
    finds its samples missing computes them together with as many announced samples as fit
    `prefetch_tokens` real tokens, in one `capture_sequences` call (grouped by length, so there is
    little padding, under `max_batch_tokens` per forward). The surplus waits in a stash that
    later steps are served from: a few large forwards instead of many small ones.

    Both buffers are bounded (oldest dropped beyond `BUFFER_FACTOR` x `prefetch_tokens` tokens),
    so samples that are announced and never asked for cannot grow memory. A stashed result is
    served only to a request with the same token ids: a sample id never gets another sequence's
    states. Results equal computing each step alone up to float rounding (padding does not change
    real rows; the padded width can move the last bit of an attention kernel's result).
    `prefetch_tokens=0` computes each step on its own.
    """

    BUFFER_FACTOR = 4  # pending and stash each hold at most this many times `prefetch_tokens` tokens

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        fingerprint: VerifierFingerprint,
        target_layer_ids: list[int],
        max_batch_tokens: int = 32768,
        prefetch_tokens: int = 65536,
        output_dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch_tokens < 1 or prefetch_tokens < 0:
            raise ValueError(
                f"max_batch_tokens must be >= 1 and prefetch_tokens >= 0, got {max_batch_tokens} "
                f"and {prefetch_tokens}"
            )
        self.model = model
        self._fingerprint = fingerprint
        self._target_layer_ids = list(target_layer_ids)
        # Layer N rides along with the requested ids: it feeds the training targets.
        self._capture_ids = [*self._target_layer_ids, fingerprint.num_layers]
        self.max_batch_tokens = max_batch_tokens
        self.prefetch_tokens = prefetch_tokens
        self.output_dtype = output_dtype
        self.device = next(model.parameters()).device
        self._pending = _TokenBoundedQueue(self.BUFFER_FACTOR * prefetch_tokens)  # id -> input_ids
        self._stash = _TokenBoundedQueue(self.BUFFER_FACTOR * prefetch_tokens)  # id -> (ids, states)

    @property
    def fingerprint(self) -> VerifierFingerprint:
        return self._fingerprint

    @property
    def target_layer_ids(self) -> list[int]:
        return self._target_layer_ids

    @property
    def pending_tokens(self) -> int:
        """Tokens announced by `prefetch` and not computed yet."""
        return self._pending.tokens

    @property
    def stashed_tokens(self) -> int:
        """Tokens computed ahead and not asked for yet."""
        return self._stash.tokens

    def extract(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        found = [self._take_stashed(r) for r in requests]
        missing = [r for r, states in zip(requests, found, strict=True) if states is None]
        if missing:
            computed = iter(self._compute_with_pending(missing))
            found = [states if states is not None else next(computed) for states in found]
        return found  # type: ignore[return-value]

    def prefetch(self, requests: Sequence[SampleRequest]) -> None:
        """Record the announced samples; they are computed with the next step that misses."""
        if self.prefetch_tokens == 0:
            return
        for request in requests:
            if request.sample_id not in self._stash and request.sample_id not in self._pending:
                self._pending.put(request.sample_id, request.input_ids, tokens=request.input_ids.numel())

    def close(self) -> None:
        self._pending.clear()
        self._stash.clear()
        self.model = None  # type: ignore[assignment]

    def _take_stashed(self, request: SampleRequest) -> SampleHiddenStates | None:
        """The stashed result for `request`, removed from the stash; None if absent or stale."""
        entry = self._stash.pop(request.sample_id)
        if entry is None:
            return None
        input_ids, states = entry
        if input_ids.shape != request.input_ids.shape or not torch.equal(
            input_ids.cpu(), request.input_ids.cpu()
        ):
            return None  # the id now names another sequence: recompute
        return states

    def _compute_with_pending(self, missing: list[SampleRequest]) -> list[SampleHiddenStates]:
        """States for `missing` (in order); announced samples that fit the budget are stashed."""
        for request in missing:
            self._pending.pop(request.sample_id)
        budget = self.prefetch_tokens - sum(r.input_ids.numel() for r in missing)
        extra = []
        while self._pending and self._pending.oldest_tokens() <= budget:
            sample_id, input_ids = self._pending.pop_oldest()
            extra.append(SampleRequest(sample_id=sample_id, input_ids=input_ids))
            budget -= input_ids.numel()
        states = self._compute([*missing, *extra])
        for request, result in zip(extra, states[len(missing) :], strict=True):
            self._stash.put(request.sample_id, (request.input_ids, result), tokens=request.input_ids.numel())
        return states[: len(missing)]

    def _compute(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        planes = capture_sequences(
            self.model,
            [r.input_ids for r in requests],
            layer_ids=self._capture_ids,
            max_batch_tokens=self.max_batch_tokens,
        )
        return [self._split(r.sample_id, sample) for r, sample in zip(requests, planes, strict=True)]

    def _split(self, sample_id: int, sample: torch.Tensor) -> SampleHiddenStates:
        """sample [t, K+1, H] -> aux [t, K*H] (layer-major on the feature axis) and last [t, H].

        Both are fresh contiguous copies (`copy=True`: even a slice that is already contiguous, a
        one-token sample's, is copied), so nothing keeps the padded batch they came from alive
        (what the stash holds is what its token count says).
        """
        num_aux = len(self._target_layer_ids)
        dtype = self.output_dtype or sample.dtype
        contiguous = torch.contiguous_format
        return SampleHiddenStates(
            sample_id=sample_id,
            aux=sample[:, :num_aux].to(dtype, memory_format=contiguous, copy=True).flatten(1),
            last=sample[:, num_aux].to(dtype, memory_format=contiguous, copy=True),
        )


class _TokenBoundedQueue:
    """An insertion-ordered map whose values carry a token count; the oldest go beyond `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tokens = 0
        self._items: OrderedDict[int, tuple[Any, int]] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: int, value: Any, *, tokens: int) -> None:
        self.pop(key)
        self._items[key] = (value, tokens)
        self.tokens += tokens
        while self.tokens > self.limit and self._items:
            self.pop_oldest()

    def pop(self, key: int) -> Any | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.tokens -= item[1]
        return item[0]

    def pop_oldest(self) -> tuple[int, Any]:
        key, (value, tokens) = self._items.popitem(last=False)
        self.tokens -= tokens
        return key, value

    def oldest_tokens(self) -> int:
        return next(iter(self._items.values()))[1]

    def clear(self) -> None:
        self._items.clear()
        self.tokens = 0
