"""Where the trainer gets the verifier's hidden states: the `HiddenStateSource` interface.

A source turns token ids into the two planes the DFlash objective needs, per sample:
`aux` [t, K*H] (the `--target-layer-ids`, concatenated on the feature axis in the order given)
and `last` [t, H] (layer N, the last decoder layer's output BEFORE the final norm; DESIGN 2.1).

Implementations: `InProcessSource` (runs the verifier with transformers inside the trainer) here,
`GrpcSource` (the hidden-state service's client, `grpc_source.py`) and `CachingSource` (a local
store in front of either, `cache.py`); the trainer never knows which one it talks to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
        """A hint: these will be extracted soon. Remote sources start moving them; others ignore it."""
        ...

    def close(self) -> None: ...


class InProcessSource:
    """Runs the verifier with transformers in this process (CPU or the trainer's GPU).

    Requests are batched under a token budget with right padding (`capture_sequences`).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        fingerprint: VerifierFingerprint,
        target_layer_ids: list[int],
        max_batch_tokens: int = 8192,
        output_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self._fingerprint = fingerprint
        self._target_layer_ids = list(target_layer_ids)
        # Layer N rides along with the requested ids: it feeds the training targets.
        self._capture_ids = [*self._target_layer_ids, fingerprint.num_layers]
        self.max_batch_tokens = max_batch_tokens
        self.output_dtype = output_dtype
        self.device = next(model.parameters()).device

    @property
    def fingerprint(self) -> VerifierFingerprint:
        return self._fingerprint

    @property
    def target_layer_ids(self) -> list[int]:
        return self._target_layer_ids

    def extract(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        planes = capture_sequences(
            self.model,
            [r.input_ids for r in requests],
            layer_ids=self._capture_ids,
            max_batch_tokens=self.max_batch_tokens,
        )
        num_aux = len(self._target_layer_ids)
        out = []
        for request, sample in zip(requests, planes, strict=True):  # sample [t, K+1, H]
            if self.output_dtype is not None:
                sample = sample.to(self.output_dtype)
            out.append(
                SampleHiddenStates(
                    sample_id=request.sample_id,
                    aux=sample[:, :num_aux].flatten(1),  # [t, K*H], layer-major on the feature axis
                    last=sample[:, num_aux],
                )
            )
        return out

    def prefetch(self, requests: Sequence[SampleRequest]) -> None:
        pass  # computed on demand, in the trainer's own process: nothing to overlap

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
