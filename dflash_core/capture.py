"""Hidden states of a transformers causal LM at our layer ids (docs/architecture.md), by forward hooks.

    id L, 0 <= L < N   what ENTERS decoder layer L: a forward pre-hook on layer L (id 0 = embeddings)
    id N               what LEAVES the last decoder layer, BEFORE the final norm: a forward hook

Why hooks and not `output_hidden_states=True`: for Llama/Qwen/Mistral models transformers returns
`hidden_states[N]` AFTER the final norm (it is `last_hidden_state`). A drafter trained on normed
id-N states computes its targets as `lm_head(norm(norm(h)))`: training runs, the loss even falls,
and vLLM (which feeds the un-normed residual) accepts ~1 token. Nothing raises. So we never read
`output_hidden_states`; `tests/core/test_capture.py` pins the convention for every id.

Works for models whose decoder layers live in `model.model.layers` (Llama, Qwen2, Qwen3,
Mistral, ...) or one of a few other common places. `layer_taps` holds the hooks open across
whole forwards (speculative decoding reads the planes of the forward that scores a block);
`capture_hidden_states` uses the same hooks but never runs the LM head (the base model is called
directly) and stops the forward right after the deepest requested layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Where decoder layers live, relative to the object passed in (tried in order).
_LAYER_PATHS = (
    "model.layers",  # *ForCausalLM: Llama, Qwen2/3, Mistral, Gemma, Phi3, ...
    "layers",  # a base model (LlamaModel, ...) passed directly
    "model.language_model.layers",  # multimodal wrappers (Qwen3-VL, Gemma3, ...)
    "language_model.model.layers",
    "model.decoder.layers",  # OPT-style
    "transformer.h",  # GPT-2 style
)


class _StopForward(Exception):
    """Raised from a hook once every requested plane is captured; the deeper layers never run."""


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(base model to call, its decoder layer list). Raises ValueError naming the places tried."""
    for path in _LAYER_PATHS:
        owner: Any = model
        parts = path.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
            if owner is None:
                break
        layers = getattr(owner, parts[-1], None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return owner, layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}. Capture supports Llama/Qwen/Mistral-style transformers models"
    )


def _first_tensor(value: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is one."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"unexpected decoder layer input/output type {type(value).__name__}")


@contextlib.contextmanager
def layer_taps(
    model: nn.Module, layer_ids: Sequence[int], *, stop_when_complete: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """While open, every forward of `model` stores its hidden states at `layer_ids` (docs/architecture.md).

    id L < N: what ENTERS decoder layer L (a pre-hook); id N: what LEAVES the last decoder layer,
    before the final norm (a forward hook). The dict maps id -> [B, T, H] of the latest forward.
    Stays open across forwards that also return logits and fill a KV cache (speculative decoding).
    With `stop_when_complete` the forward is cut short once every id is in the dict (the deeper
    layers never run) and the rest of the `with` body is skipped: put only the forward in it.
    Hooks are removed on exit, even when the forward raises.
    """
    _, layers = find_decoder_layers(model)
    num_layers = len(layers)
    bad = [i for i in layer_ids if not 0 <= i <= num_layers]
    if bad:
        raise ValueError(
            f"layer ids {bad} are out of range: the model has {num_layers} decoder layers, so valid ids "
            f"are 0..{num_layers} (id {num_layers} = the last layer's output before the final norm)"
        )
    wanted = set(layer_ids)
    captured: dict[int, torch.Tensor] = {}

    def store(layer_id: int, value: Any) -> None:
        captured[layer_id] = _first_tensor(value)
        if stop_when_complete and len(captured) == len(wanted):
            raise _StopForward

    def make_pre_hook(layer_id: int) -> Callable[[nn.Module, tuple, dict], None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            store(layer_id, args[0] if args else kwargs["hidden_states"])

        return pre_hook

    def last_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # The residual stream leaving the last layer. The final norm runs after this hook, in the
        # base model's forward: capturing `base.norm`'s OUTPUT (or hidden_states[N]) would be wrong.
        store(num_layers, output)

    handles = []
    try:
        for layer_id in sorted(wanted):
            if layer_id < num_layers:
                hook = layers[layer_id].register_forward_pre_hook(make_pre_hook(layer_id), with_kwargs=True)
            else:
                hook = layers[-1].register_forward_hook(last_hook, with_kwargs=True)
            handles.append(hook)
        yield captured
    except _StopForward:
        pass  # raised by `store` above: every requested plane is in, the forward was cut on purpose
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    layer_ids: Sequence[int],
) -> torch.Tensor:
    """Hidden states [B, T, len(layer_ids), H] at `layer_ids` (docs/architecture.md), in the order given.

    input_ids [B, T]; attention_mask [B, T] (1 = real token) or None. With a mask, position ids
    are counted over real tokens only, so a row's real tokens get the same states whether it is
    left-padded, right-padded or alone; planes at padded positions are meaningless. Runs under
    `torch.no_grad` (not `inference_mode`: the result feeds a trained drafter). The result has the
    model's dtype and device. Hooks are removed even when the forward raises.
    """
    base, _ = find_decoder_layers(model)
    ids = [int(i) for i in layer_ids]
    if not ids:
        raise ValueError("layer_ids is empty")
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        attention_mask = attention_mask.to(input_ids.device)
        kwargs["attention_mask"] = attention_mask
        # HF's base forward numbers positions 0..T-1 regardless of padding; count real tokens
        # instead so left padding does not shift RoPE positions.
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with layer_taps(model, ids, stop_when_complete=True) as captured:
        base(**kwargs)
    missing = set(ids) - set(captured)
    if missing:
        raise RuntimeError(
            f"hooks did not fire for layer ids {sorted(missing)}; does {type(base).__name__}.forward run "
            "every decoder layer in `layers`?"
        )
    return torch.stack([captured[i] for i in ids], dim=2)  # [B, T, K, H]


def batches_under_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped consecutively so each group's padded size (rows x longest) fits `max_tokens`.

    A sequence longer than the budget forms a group of its own.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups


@torch.no_grad()
def capture_sequences(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    layer_ids: Sequence[int],
    max_batch_tokens: int,
) -> list[torch.Tensor]:
    """Hidden states [t, len(layer_ids), H] of each token sequence ([t] int64), in input order.

    Sequences run in right-padded batches under a token budget (rows x longest row). They are
    grouped by ascending length: a group is as wide as its longest member, so grouping in input
    order let one long sample widen a whole group of short ones, and a budget filled with padding
    means more, smaller forwards (each one an eager HF forward with a lot of Python overhead).
    Padding never changes the real rows beyond float rounding (attention is causal, padded keys
    are masked, positions count real tokens only). Results stay on the model's device.
    """
    lengths = [int(s.numel()) for s in sequences]
    order = sorted(range(len(sequences)), key=lengths.__getitem__)
    results: list[torch.Tensor | None] = [None] * len(sequences)
    for group in batches_under_budget([lengths[i] for i in order], max_batch_tokens):
        indices = [order[position] for position in group]
        planes = _capture_padded(model, [sequences[i] for i in indices], layer_ids=layer_ids)
        for index, sample in zip(indices, planes, strict=True):
            results[index] = sample
    return results  # type: ignore[return-value]


def _capture_padded(
    model: nn.Module, sequences: Sequence[torch.Tensor], *, layer_ids: Sequence[int]
) -> list[torch.Tensor]:
    """One right-padded forward over `sequences`: each one's planes [t, K, H], padding cut off."""
    device = next(model.parameters()).device
    lengths = [int(s.numel()) for s in sequences]
    input_ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : lengths[row]] = sequence
        attention_mask[row, : lengths[row]] = 1
    planes = capture_hidden_states(
        model, input_ids.to(device), attention_mask=attention_mask.to(device), layer_ids=layer_ids
    )  # [b, width, K, H]
    return [planes[row, :length] for row, length in enumerate(lengths)]
