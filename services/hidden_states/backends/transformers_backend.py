"""The `transformers` backend: the verifier as a Hugging Face model, on CPU or one GPU.

The embedded default (SmolLM2 from its GGUF) and any HF causal LM. Hidden states come from
`dflash_core.capture` (hooks at the ids of docs/architecture.md), in padded batches under a token budget;
completions from `model.generate`, one prompt at a time. `generate_only` only marks the backend
so (the service then refuses Extract): a GPU deployment that generates at scale uses the vllm
backend's generation-only mode instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dflash_core.capture import capture_sequences
from dflash_core.verifier import (
    default_target_layer_ids,
    fingerprint_of,
    load_verifier,
    validate_target_layer_ids,
)
from services.hidden_states.backends.base import (
    BackendInfo,
    GeneratedSequence,
    GenerationParams,
    per_prompt_params,
    served_layer_ids,
)

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TransformersBackend:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name_or_path: str,
        target_layer_ids: Sequence[int] | None,
        max_length: int = 8192,
        max_batch_tokens: int = 16384,
        generate_only: bool = False,
    ) -> None:
        """Serve an already loaded model (in eval mode, frozen); `load` builds one by name."""
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        fingerprint = fingerprint_of(model.config, tokenizer, name_or_path=name_or_path)
        ids = list(target_layer_ids or default_target_layer_ids(fingerprint.num_layers))
        validate_target_layer_ids(ids, fingerprint.num_layers)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not eos_ids and tokenizer.eos_token_id is not None:
            eos_ids = (int(tokenizer.eos_token_id),)
        self._info = BackendInfo(
            name="transformers",
            fingerprint=fingerprint,
            layer_ids=served_layer_ids(ids, fingerprint.num_layers),
            dtype=dtype,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            eos_token_ids=eos_ids,
            generate_only=generate_only,
        )
        logger.info(
            "transformers backend: %s on %s in %s, serving layer ids %s",
            name_or_path,
            self.device,
            dtype,
            list(self._info.layer_ids),
        )

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        *,
        target_layer_ids: Sequence[int] | None,
        dtype: torch.dtype,
        device: str = "auto",
        max_length: int = 8192,
        max_batch_tokens: int = 16384,
        generate_only: bool = False,
    ) -> TransformersBackend:
        model, tokenizer = load_verifier(model_name_or_path, device=resolve_device(device), dtype=dtype)
        return cls(
            model,
            tokenizer,
            name_or_path=model_name_or_path,
            target_layer_ids=target_layer_ids,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            generate_only=generate_only,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def extract(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # Empty sequences never reach the model (attention cannot take zero keys): [0, K, H].
        width, hidden = len(self._info.layer_ids), self._info.fingerprint.hidden_size
        results = [torch.empty(0, width, hidden, dtype=self._info.dtype) for _ in sequences]
        nonempty = [i for i, s in enumerate(sequences) if s.numel() > 0]
        planes = capture_sequences(
            self.model,
            [sequences[i] for i in nonempty],
            layer_ids=self._info.layer_ids,
            max_batch_tokens=self._info.max_batch_tokens,
        )
        for index, plane in zip(nonempty, planes, strict=True):
            # One device-to-host copy per sample, in the wire dtype.
            results[index] = plane.to(device="cpu", dtype=self._info.dtype)
        return results

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[list[int]], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[GeneratedSequence]:
        # One prompt at a time: no padding questions, and the embedded default runs on CPU anyway;
        # so a reply never depends on which other prompts share the call (merged Generate calls).
        results = []
        for prompt, own in zip(prompts, per_prompt_params(params, len(prompts)), strict=True):
            stop_ids = {*self._info.eos_token_ids, *own.stop_token_ids}
            input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            sampling = own.temperature > 0
            kwargs = {
                "max_new_tokens": own.max_new_tokens,
                "do_sample": sampling,
                "eos_token_id": sorted(stop_ids) or None,
                "pad_token_id": self.tokenizer.pad_token_id or next(iter(self._info.eos_token_ids), 0),
            }
            if sampling:
                kwargs.update(temperature=own.temperature, top_p=own.top_p, top_k=own.top_k or None)
                torch.manual_seed(own.seed)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            new = output[0, len(prompt) :].tolist()
            finish = "stop" if new and new[-1] in stop_ids else "length"
            results.append(GeneratedSequence(token_ids=new, finish_reason=finish))
        return results

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
