"""Batched generation with a transformers causal LM: left-padded batches sorted by length.

Many prompts at once, for throughput where no vLLM runs (a CPU, a quick GPU job): prompts are
sorted by length and cut into batches of at most `max_batch` rows and `max_batch_tokens` prompt +
new tokens, each one `model.generate` call. A reply ends at its first stop id, which is removed.

Results depend on how prompts fall into batches (padding and batch shape change the numerics a
little), so they are reproducible for the same prompts and settings, not equal to generating the
prompts one by one. Sampling seeds each batch with `seed` + the index (in the call) of its first
prompt in length order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["batched_generate"]


def batched_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    max_batch: int,
    max_batch_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    cache: str = "dynamic",
) -> list[list[int]]:
    """One reply per prompt, in order: the new token ids up to (not including) the first stop id.

    `temperature` 0 is greedy. `cache` is transformers' `cache_implementation` ("dynamic" grows
    the KV cache every step, "static" allocates it once per batch).
    """
    device = next(model.parameters()).device
    stops = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    start = 0
    while start < len(order):
        end = start + 1
        # Sorted ascending: the last row of a batch is its longest.
        while (
            end < len(order)
            and end - start < max_batch
            and (end - start + 1) * (len(prompts[order[end]]) + max_new_tokens) <= max_batch_tokens
        ):
            end += 1
        batch = [prompts[i] for i in order[start:end]]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):  # left padding: every prompt ends at column width-1
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        out = _generate(
            model,
            ids.to(device),
            mask.to(device),
            stop_ids=list(stop_ids),
            pad_id=pad_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + start,
            cache=cache,
        )
        for row, tokens in zip(order[start:end], out[:, width:].tolist(), strict=True):
            cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            replies[row] = tokens[:cut]
        start = end
    return replies


def _generate(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    cache: str,
) -> torch.Tensor:
    sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            cache_implementation=cache,
            **sampling,
        )
