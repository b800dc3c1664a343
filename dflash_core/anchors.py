"""Anchor sampling (resampled every epoch) and block construction with the mask token.

An anchor is a row position a where a block starts: slot 0 holds the real token at a, slots
1..B-1 hold `mask_token_id` and are trained to predict the verifier's greedy tokens at a+1..a+B-1.

Eligibility (our rule, deliberately stricter than speculators 0.9.0, which samples any
supervised row except the last `block_size` rows of the packed row): a is eligible iff

    loss_mask[a] and a + 1 < T and document_ids[a + 1] == document_ids[a] != -1 and loss_mask[a + 1]

i.e. at least slot 1 is supervised, inside the anchor's own document. Blocks may still run past
their document's (or the row's) end; `build_blocks` gives those slots no loss (docs/architecture.md), where
speculators would train them against the next document's targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def eligible_anchors(loss_mask: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions that may start a block (see the module docstring)."""
    eligible = torch.zeros_like(loss_mask, dtype=torch.bool)
    eligible[:, :-1] = (
        loss_mask[:, :-1]
        & loss_mask[:, 1:]
        & (document_ids[:, :-1] != -1)
        & (document_ids[:, 1:] == document_ids[:, :-1])
    )
    return eligible


def sample_anchors(
    loss_mask: torch.Tensor,
    document_ids: torch.Tensor,
    *,
    max_anchors: int,
    generator: torch.Generator,
    pad_to_max: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to `max_anchors` eligible anchors per row, uniformly without replacement.

    loss_mask [B, T] bool, document_ids [B, T] int64 (-1 = padding). Returns
    `(anchors [B, N] int64, anchor_valid [B, N] bool)`: each row's anchors ascending, then padding
    (anchor 0, valid False). N is the largest per-row count (at least 1, so the forward always has
    a graph to backpropagate through), or `max_anchors` with `pad_to_max` (fixed shapes for
    torch.compile). Deterministic given the generator's state; the random keys are drawn on the
    generator's device, so a CPU generator gives the same anchors whatever device the masks live on.
    The block size plays no part: blocks past a document end are masked, not avoided.
    """
    eligible = eligible_anchors(loss_mask.bool(), document_ids)
    rows, T = eligible.shape
    keys = torch.rand((rows, T), generator=generator, device=generator.device).to(eligible.device)
    # Uniform keys, top-k among the eligible = a uniform random subset without replacement.
    keys = torch.where(eligible, keys, torch.full_like(keys, -1.0))
    counts = eligible.sum(dim=1)
    # N needs one host read of the counts: sample on CPU tensors (as the trainer does) to keep it free.
    num = max_anchors if pad_to_max else max(1, min(max_anchors, int(counts.max()) if rows else 1))
    k = min(num, T)
    chosen = keys.topk(k, dim=1).indices  # [B, k]
    valid = torch.gather(keys, 1, chosen) >= 0
    # Sort the valid picks ascending; padding (key T) sorts after them and is then set to 0.
    chosen = torch.where(valid, chosen, torch.full_like(chosen, T)).sort(dim=1).values
    valid = chosen < T
    anchors = torch.where(valid, chosen, torch.zeros_like(chosen))
    if k < num:  # pad_to_max with max_anchors > T
        pad = num - k
        anchors = torch.cat((anchors, anchors.new_zeros(rows, pad)), dim=1)
        valid = torch.cat((valid, valid.new_zeros(rows, pad)), dim=1)
    return anchors, valid


def trim_anchor_padding(
    anchors: torch.Tensor, anchor_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors, anchor_valid) [B, N] cut to the most valid anchors any row has (at least 1 column).

    Each row's valid anchors must come first, as `sample_anchors` and live acceptance's `batch_of`
    lay them out. SDPA then skips the padding columns; the compiled flex path keeps the full width
    instead (one shape every step, else it recompiles). One host read of the counts (a sync on a
    device; the callers trim CPU tensors).
    """
    keep = max(1, int(anchor_valid.sum(dim=1).max()))
    return anchors[:, :keep], anchor_valid[:, :keep]


@dataclass(frozen=True)
class Blocks:
    """Per-slot description of all blocks of a batch. Slot q = j * block_size + k; shapes [B, Q]."""

    anchors: torch.Tensor  # [B, N]
    anchor_valid: torch.Tensor  # [B, N]
    block_size: int
    base_index: torch.Tensor  # a + k (may reach past the row end; such slots are masked)
    position_ids: torch.Tensor  # position_ids[a] + k: continues the anchor's document numbering
    input_ids: torch.Tensor  # input_ids[a] at k = 0, mask_token_id elsewhere
    target_index: (
        torch.Tensor
    )  # (a + k - 1) mod T: the verifier row whose next-token prediction is slot k's label
    loss_mask: torch.Tensor  # bool: slot k is supervised


def build_blocks(
    *,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    document_ids: torch.Tensor,
    position_ids: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> Blocks:
    """Lay out the blocks starting at `anchors` [B, N] over a packed batch ([B, T] tensors).

    slot loss mask = loss_mask[a+k] AND anchor_valid AND k >= 1 AND a+k < T AND
    document_ids[a+k] == document_ids[a] != -1. The last two are our deliberate difference from
    speculators (docs/architecture.md): a block never trains past the end of its document.
    """
    T = input_ids.shape[1]
    rows, num_anchors = anchors.shape
    k = torch.arange(block_size, device=anchors.device)
    base = (anchors.unsqueeze(-1) + k).flatten(1)  # [B, Q]
    in_row = base < T
    base_clamped = base.clamp(max=T - 1)
    slot = k.repeat(num_anchors).expand(rows, -1)  # [B, Q]
    anchor_per_slot = anchors.repeat_interleave(block_size, dim=1)  # [B, Q]
    valid_per_slot = anchor_valid.repeat_interleave(block_size, dim=1)
    anchor_doc = torch.gather(document_ids, 1, anchor_per_slot)
    same_doc = (torch.gather(document_ids, 1, base_clamped) == anchor_doc) & (anchor_doc != -1)
    slot_loss_mask = (
        torch.gather(loss_mask.bool(), 1, base_clamped) & valid_per_slot & (slot >= 1) & in_row & same_doc
    )
    draft_input_ids = torch.where(
        slot == 0, torch.gather(input_ids, 1, anchor_per_slot), torch.full_like(base, mask_token_id)
    )
    return Blocks(
        anchors=anchors,
        anchor_valid=anchor_valid,
        block_size=block_size,
        base_index=base,
        position_ids=torch.gather(position_ids, 1, anchor_per_slot) + slot,
        input_ids=draft_input_ids,
        # Wraps like speculators (slot 0 of an anchor at 0 reads row T-1); wrapped slots are never trained.
        target_index=(base - 1) % T,
        loss_mask=slot_loss_mask,
    )
