"""The mask token: the id that fills block slots 1..B-1 (docs/architecture.md), chosen once per verifier.

The choice is stored in the checkpoint and vLLM fills each block with exactly that id, so it is
made here, in one place, and logged with the reason it was made.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_mask_token_id(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, override: int | None = None
) -> int:
    """The id placed in block slots 1..B-1 (docs/architecture.md), in this order of preference:

    1. `override` (`--mask-token-id`), which must have an embedding row (< vocab_size);
    2. the tokenizer's own mask token;
    3. `len(tokenizer)`, the first embedding row no text ever produces (Qwen3: 151669 of 151936),
       when the embedding has more rows than the tokenizer has tokens;
    4. the pad token, else the eos token (as speculators does; SmolLM2 lands here).

    The choice is stored in the checkpoint, and vLLM fills the block with exactly that id; a
    drafter trained with one mask id and served with another drafts garbage without an error.
    """
    if override is not None:
        if not 0 <= override < vocab_size:
            raise ValueError(
                f"--mask-token-id {override} has no embedding row (verifier vocab_size {vocab_size}); "
                f"pick an id in 0..{vocab_size - 1} or leave it unset"
            )
        logger.info("mask token id %d: given by --mask-token-id", override)
        return override
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is not None and 0 <= mask_id < vocab_size:
        logger.info("mask token id %d: the tokenizer's mask token %r", mask_id, tokenizer.mask_token)
        return int(mask_id)
    if len(tokenizer) < vocab_size:
        unused = len(tokenizer)
        logger.info(
            "mask token id %d: the tokenizer has no mask token and the embedding has %d rows beyond its %d "
            "tokens; using the first row the tokenizer never produces",
            unused,
            vocab_size - unused,
            unused,
        )
        return unused
    for role in ("pad", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and 0 <= token_id < vocab_size:
            logger.info(
                "mask token id %d: no mask token and no spare embedding row (vocab %d, tokenizer %d); "
                "using the %s token %r",
                token_id,
                vocab_size,
                len(tokenizer),
                role,
                getattr(tokenizer, f"{role}_token"),
            )
            return int(token_id)
    raise ValueError(
        "cannot choose a mask token: the tokenizer has no mask, pad or eos token and no spare embedding "
        "row; pass --mask-token-id"
    )
