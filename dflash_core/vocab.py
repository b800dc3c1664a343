"""Reduced draft vocabulary: pick the most frequent target tokens, build `d2t` offsets and `t2d` mask.

A drafter with a reduced vocabulary scores only D of the verifier's V tokens. Two tensors, stored in
the checkpoint exactly as speculators writes them and vLLM reads them, map between the id spaces:

    d2t  int64 [D]  OFFSETS: the target id of draft id i is `i + d2t[i]` (not the id itself)
    t2d  bool  [V]  t2d[t] is True iff target id t is in the draft vocabulary

Draft ids are assigned in ascending target-id order, so `d2t` is non-decreasing and non-negative.
Silent failure: storing target ids instead of offsets in `d2t` loads fine in vLLM and then maps
every draft token to the wrong target token (acceptance ~1); `validate_draft_vocab` catches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftVocab:
    """The draft vocabulary: `d2t` int64 [D] offsets and `t2d` bool [V] membership mask."""

    d2t: torch.Tensor
    t2d: torch.Tensor

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.t2d.numel())

    def target_ids(self) -> torch.Tensor:
        """int64 [D]: the target id of every draft id."""
        return draft_to_target_ids(self.d2t)


def build_draft_vocab(
    token_freq: torch.Tensor, draft_vocab_size: int, *, vocab_size: int | None = None
) -> DraftVocab:
    """The `draft_vocab_size` most frequent target ids of `token_freq` [V] (ties: lower id first).

    When fewer than D tokens were ever seen, the lowest unseen ids fill the rest, so D is exact
    (the checkpoint's `draft_vocab_size` must match its tensors). `vocab_size` pads `token_freq`
    with zero counts up to the verifier's embedding rows when the data counted fewer ids (Qwen3's
    tokenizer has 151669 tokens, its embedding 151936 rows).
    """
    freq = _checked_freq(token_freq, vocab_size=vocab_size)
    total = freq.numel()
    if not isinstance(draft_vocab_size, int) or draft_vocab_size <= 0:
        raise ValueError(f"--draft-vocab-size must be a positive int, got {draft_vocab_size!r}")
    if draft_vocab_size > total:
        raise ValueError(
            f"--draft-vocab-size {draft_vocab_size} exceeds the verifier vocabulary ({total} tokens); "
            "use a smaller value, or leave it unset for the full vocabulary"
        )
    # Stable sort on descending count keeps ascending ids among equal counts: that breaks ties by
    # id and, since unseen ids all count 0, fills with the lowest unseen ids.
    order = torch.sort(freq, descending=True, stable=True).indices
    chosen = torch.sort(order[:draft_vocab_size]).values
    d2t = chosen - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(total, dtype=torch.bool)
    t2d[chosen] = True
    seen = int((freq > 0).sum())
    if seen < draft_vocab_size:
        logger.warning(
            "only %d distinct tokens were seen in the data; %d unseen ids fill the draft vocabulary of %d",
            seen,
            draft_vocab_size - seen,
            draft_vocab_size,
        )
    vocab = DraftVocab(d2t=d2t, t2d=t2d)
    validate_draft_vocab(vocab.d2t, vocab.t2d)
    return vocab


def _checked_freq(token_freq: torch.Tensor, *, vocab_size: int | None) -> torch.Tensor:
    if not isinstance(token_freq, torch.Tensor) or token_freq.dim() != 1 or token_freq.numel() == 0:
        shape = tuple(token_freq.shape) if isinstance(token_freq, torch.Tensor) else type(token_freq).__name__
        raise ValueError(f"token_freq must be a non-empty 1-D tensor [vocab_size], got {shape}")
    if token_freq.is_floating_point() and bool(torch.isnan(token_freq).any()):
        raise ValueError("token_freq contains NaN")
    if bool((token_freq < 0).any()):
        raise ValueError("token_freq has negative counts")
    freq = token_freq.detach().to("cpu", torch.float64 if token_freq.is_floating_point() else torch.int64)
    if vocab_size is not None:
        if vocab_size < freq.numel():
            raise ValueError(f"vocab_size {vocab_size} is smaller than token_freq ({freq.numel()} ids)")
        freq = torch.cat([freq, freq.new_zeros(vocab_size - freq.numel())])
    return freq


def draft_to_target_ids(d2t: torch.Tensor) -> torch.Tensor:
    """int64 [D]: target id of each draft id (`i + d2t[i]`)."""
    _check_d2t(d2t)
    return torch.arange(d2t.numel(), dtype=torch.int64, device=d2t.device) + d2t.long()


def target_to_draft_ids(t2d: torch.Tensor) -> torch.Tensor:
    """int64 [V]: draft id of each target id, -1 where the target id is not in the draft vocabulary."""
    _check_t2d(t2d)
    draft = torch.cumsum(t2d.long(), dim=0) - 1
    return torch.where(t2d, draft, torch.full_like(draft, -1))


def validate_draft_vocab(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise `ValueError` unless `d2t` and `t2d` describe the same sorted draft vocabulary."""
    _check_d2t(d2t)
    _check_t2d(t2d)
    if int(t2d.sum()) != d2t.numel():
        raise ValueError(f"t2d marks {int(t2d.sum())} tokens but d2t has {d2t.numel()} entries")
    targets = draft_to_target_ids(d2t)
    if d2t.numel() > 1 and not bool((targets[1:] > targets[:-1]).all()):
        raise ValueError("d2t must map draft ids to strictly increasing target ids (offsets, not ids?)")
    if int(targets[0]) < 0 or int(targets[-1]) >= t2d.numel():
        raise ValueError(f"d2t maps outside the target vocabulary [0, {t2d.numel()})")
    if not bool(t2d[targets].all()):
        raise ValueError("d2t and t2d disagree: a draft token's target id is not marked in t2d")


def _check_d2t(d2t: torch.Tensor) -> None:
    if not isinstance(d2t, torch.Tensor) or d2t.dim() != 1 or d2t.numel() == 0:
        raise ValueError("d2t must be a non-empty 1-D tensor [draft_vocab_size]")
    if d2t.dtype != torch.int64:
        raise ValueError(f"d2t must be int64 (offsets), got {d2t.dtype}")


def _check_t2d(t2d: torch.Tensor) -> None:
    if not isinstance(t2d, torch.Tensor) or t2d.dim() != 1 or t2d.numel() == 0:
        raise ValueError("t2d must be a non-empty 1-D tensor [vocab_size]")
    if t2d.dtype != torch.bool:
        raise ValueError(f"t2d must be bool, got {t2d.dtype}")
