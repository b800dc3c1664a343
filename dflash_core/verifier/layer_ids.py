"""Layer ids (docs/architecture.md): the default choice of target layers and the check of a given one.

A verifier with N decoder layers has N + 1 hidden-state planes:

    id L, 0 <= L < N   the residual stream ENTERING decoder layer L (id 0 = the embedding output);
                       equals Hugging Face `output_hidden_states[L]`.
    id N               the last decoder layer's output BEFORE the final norm. Hugging Face's
                       `output_hidden_states[N]` is AFTER the final norm for Llama/Qwen models, so
                       it is NOT our id N (`dflash_core.capture` takes it with a hook).

speculators' `aux_hidden_state_layer_ids` use exactly this convention. vLLM's DFlash model and
z-lab's reference code index the same planes as L - 1 ("output of layer L - 1"); vLLM converts a
speculators config itself (`dflash_config.target_layer_ids = [L - 1 ...]`), so our checkpoints
store our ids unshifted. An off-by-one here trains fine and accepts ~1 token: nothing raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from numbers import Integral

logger = logging.getLogger(__name__)


def default_target_layer_ids(num_layers: int, count: int = 3) -> list[int]:
    """`count` ids spread evenly from 2 to N - 3, rounded half up; deduplicated, ascending.

    id_i = floor(2 + i * (N - 5) / (count - 1) + 0.5), i = 0..count-1. For count 3 this is
    [2, N // 2, N - 3], speculators' default and the DFlash tutorial's choice ([2, 18, 33] for
    Qwen3-8B's 36 layers, [2, 15, 27] for SmolLM2's 30). When 2..N-3 holds fewer than `count`
    ids (tiny verifiers) the span widens to 1..N-1; ids 0 (raw embeddings) and N (always sent
    separately as the target plane) are never picked. Fewer than `count` ids come back only when
    the verifier has fewer than `count` inner planes.
    """
    if num_layers < 1:
        raise ValueError(f"a verifier needs at least one decoder layer, got num_layers={num_layers}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    low, high = 2, num_layers - 3
    if high - low + 1 < count:
        high = num_layers - 1
        low = min(1, high)
    if count == 1:
        return [(low + high + 1) // 2]
    ids = sorted(
        {
            (2 * low * (count - 1) + 2 * i * (high - low) + (count - 1)) // (2 * (count - 1))
            for i in range(count)
        }
    )
    if len(ids) < count:
        logger.info("a %d-layer verifier offers only %d distinct layer ids: %s", num_layers, len(ids), ids)
    return ids


def validate_target_layer_ids(ids: Sequence[int], num_layers: int) -> None:
    """Raise ValueError (naming --target-layer-ids) unless every id is in 0..N, distinct, non-empty.

    Id N is allowed (docs/architecture.md). Serving caveat: vLLM target models that collect aux states only
    inside their layer loop (the stream entering layers 0..N-1) hand a drafter with aux id N one
    plane too few; vLLM then fails loudly at the first draft (fc input size), not silently.
    """
    valid = (
        f"valid ids are 0..{num_layers} (id L = the residual stream entering decoder layer L; "
        f"{num_layers} = the last layer's output before the final norm)"
    )
    suggestion = " ".join(str(i) for i in default_target_layer_ids(num_layers))
    if not ids:
        raise ValueError(f"--target-layer-ids is empty; {valid}. Try --target-layer-ids {suggestion}")
    for layer_id in ids:
        is_int = isinstance(layer_id, Integral) and not isinstance(layer_id, bool)
        if not is_int or not 0 <= layer_id <= num_layers:
            raise ValueError(
                f"--target-layer-ids {layer_id!r} is out of range for a verifier with {num_layers} decoder "
                f"layers: {valid}. Try --target-layer-ids {suggestion} (the default spread)"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"--target-layer-ids {list(ids)} repeats an id; {valid}. Try --target-layer-ids {suggestion}"
        )
