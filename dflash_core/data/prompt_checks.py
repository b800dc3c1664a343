"""The checks a self-written user turn passes before it is answered: filters, then duplicates.

Built from `PrepareDataConfig` (`--self-min-prompt-tokens`, `--self-max-prompt-tokens`,
`--self-language`, `--self-dedup`, `--self-near-duplicate`). Filters run first, so a refused text
never enters the duplicate index; a kept one does, and every later text is compared with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from dflash_core.config import PrepareDataConfig
from dflash_core.data.dedup import Deduplicator
from dflash_core.data.self_prompt import CheckPrompt
from dflash_core.data.text_filters import TextFilter, TextFilterConfig

__all__ = ["prompt_check"]


def prompt_check(config: PrepareDataConfig) -> CheckPrompt:
    """A `CheckPrompt`: why a written user turn is refused (a filter's reason, or a duplicate), or None."""
    text_filter = TextFilter(
        TextFilterConfig(
            min_tokens=config.self_min_prompt_tokens,
            max_tokens=config.self_max_prompt_tokens,
            language=config.self_language,
        )
    )
    dedup = None
    if config.self_dedup != "none":
        near = config.self_near_duplicate if config.self_dedup == "near" else None
        dedup = Deduplicator(near_threshold=near, seed=config.seed)

    def check(text: str, ids: Sequence[int]) -> str | None:
        reason = text_filter.check(text, token_count=len(ids))
        if reason is None and dedup is not None:
            reason = dedup.add(text)
        return reason

    return check
