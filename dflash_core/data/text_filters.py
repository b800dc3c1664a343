"""Filters for a user turn the verifier wrote: length, language, degenerate text. Each names its reason.

`TextFilter.check(text, token_count=n)` returns why the text is refused (`too_short`,
`too_long`, `degenerate`, `language`) or None; `counts` adds the refusals up by reason, for the
"rows dropped by each filter" of `dflash_data.json`.

Language: `langid` (a pure-Python identifier that ships its model) decides for texts of at least
`min_language_words` words; shorter ones are unreliable for any identifier, so they are kept
when their letters are in the language's script (Latin for the languages listed in `_LATIN`).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TextFilter", "TextFilterConfig"]

# Languages written in the Latin script: a short text in another script is not one of them.
_LATIN = frozenset(
    {"af", "ca", "cs", "cy", "da", "de", "en", "es", "et", "eu", "fi", "fr", "ga", "gl", "hr", "hu", "id"}
    | {"is", "it", "lt", "lv", "ms", "nl", "no", "pl", "pt", "ro", "sk", "sl", "sq", "sv", "sw", "tr", "vi"}
)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class TextFilterConfig:
    min_tokens: int = 1
    max_tokens: int | None = None
    language: str | None = None  # ISO 639-1, e.g. "en"; None keeps every language
    min_language_words: int = 4
    # A text whose most common word makes up more than this share of its words is degenerate
    # ("the the the ...", one emoji repeated), once it has at least 4 words.
    max_repeated_share: float = 0.5


@dataclass
class TextFilter:
    config: TextFilterConfig
    counts: Counter[str] = field(default_factory=Counter)

    def check(self, text: str, *, token_count: int) -> str | None:
        """Why `text` (of `token_count` tokens) is refused, or None; refusals are counted."""
        reason = self._reason(text, token_count=token_count)
        if reason is not None:
            self.counts[reason] += 1
        return reason

    def _reason(self, text: str, *, token_count: int) -> str | None:
        c = self.config
        if token_count < c.min_tokens:
            return "too_short"
        if c.max_tokens is not None and token_count > c.max_tokens:
            return "too_long"
        words = _WORD.findall(text.casefold())
        if not words or (
            len(words) >= 4 and max(Counter(words).values()) > c.max_repeated_share * len(words)
        ):
            return "degenerate"
        if c.language is not None and not _in_language(text, words=len(words), config=c):
            return "language"
        return None


def _in_language(text: str, *, words: int, config: TextFilterConfig) -> bool:
    if words < config.min_language_words:
        letters = [ch for ch in text if ch.isalpha()]
        if config.language not in _LATIN or not letters:
            return True  # too short to judge
        return sum(_is_latin(ch) for ch in letters) >= 0.8 * len(letters)
    language, _ = _identifier().classify(text)
    return language == config.language


def _is_latin(char: str) -> bool:
    return char.isascii() or "\u00c0" <= char <= "\u024f"


@functools.cache
def _identifier() -> Any:
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError as exc:
        raise RuntimeError(
            "--self-language needs the `langid` package: pip install langid (it ships its model)"
        ) from exc
    return LanguageIdentifier.from_modelstring(model, norm_probs=False)
