"""Live acceptance: the tau of greedy speculative decoding, measured during training without decoding.

Greedy decoding is lossless, so the committed tokens are always the verifier's greedy continuation
of the prompt, whatever the drafter proposes: the verifier's hidden states come from ONE forward
over prompt + continuation, and the drafter's proposal at a round depends only on that. So the
drafter proposes at EVERY position a round could anchor at, in batched training-style forwards
(`dflash_core.objective.draft_blocks`), and `replay_greedy` walks the rounds as
`speculative_generate` does: tau and the per-position acceptance come out as `dflash eval` counts
them (`SpecDecodeStats`). Only numerics may differ (identical counts in float32,
tests/services/trainer/test_live_acceptance.py). The continuation is max_new_tokens + B - 1 tokens,
never stopped at an EOS (`continuation_length`); an evaluation costs drafter forwards only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dflash_core.batch import PackedBatch, SamplePiece, collate, plan_rows
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import AttentionKind, draft_blocks
from dflash_core.spec_decode import SpecDecodeStats, greedy_accept, reached_stop, returned_tokens

# Draft slots whose logits are materialised at once: [chunk, draft vocab] float (bounded memory
# with a 150k vocab; the argmax is all that is kept).
LOGIT_CHUNK_SLOTS = 2048


def continuation_length(*, max_new_tokens: int, block_size: int) -> int:
    """Greedy tokens needed after a prompt: the last round may judge B - 1 tokens past max_new_tokens."""
    return max_new_tokens + block_size - 1


def anchors_per_prompt(max_new_tokens: int) -> int:
    """Rounds can anchor after 1 .. max_new_tokens - 1 committed tokens."""
    return max_new_tokens - 1


@dataclass
class EvalSequence:
    """One held-out prompt, the verifier's greedy continuation and the hidden states of the context."""

    prompt_ids: list[int]
    continuation: list[int]  # continuation_length(...) greedy tokens, EOS not stopping it
    max_new_tokens: int
    aux: torch.Tensor | None = None  # [row_length, K*Hv]: aux layers in layer-id order (docs/architecture.md)

    @property
    def row_ids(self) -> list[int]:
        """The tokens whose hidden states the drafter may see: prompt + c_0 .. c_{max_new-2}."""
        return self.prompt_ids + self.continuation[: anchors_per_prompt(self.max_new_tokens)]


def row_length(*, prompt_tokens: int, max_new_tokens: int) -> int:
    return prompt_tokens + anchors_per_prompt(max_new_tokens)


# --------------------------------------------------------------------------------------------
# The walk: rounds of greedy speculative decoding over a known continuation
# --------------------------------------------------------------------------------------------


def replay_greedy(
    sequence: EvalSequence,
    drafts: Sequence[Sequence[int]],
    *,
    block_size: int,
    eos_token_ids: set[int],
) -> SpecDecodeStats:
    """The counters `speculative_generate` would give (greedy), from the drafter's proposals.

    drafts[j - 1]: the B-1 verifier token ids proposed with j tokens committed (the anchor
    c_{j-1} at position n + j - 1), for j = 1 .. max_new_tokens - 1. A round accepts a = the
    longest prefix equal to c_j .. c_{j+B-2} and commits c_j .. c_{j+a}; the prefill's c_0 is not
    a draft. Stops at max_new_tokens tokens or an EOS among the newly committed ones.
    """
    B, max_new = block_size, sequence.max_new_tokens
    c = sequence.continuation
    if len(c) < continuation_length(max_new_tokens=max_new, block_size=B):
        raise ValueError(f"the continuation has {len(c)} tokens; the rounds need {max_new + B - 1}")
    stats = SpecDecodeStats(
        num_draft_tokens=B - 1, prompts=1, prompt_tokens=len(sequence.prompt_ids), verifier_forwards=1
    )
    committed, new = 1, 1  # the prefill commits c_0
    while not reached_stop(c[:committed], new=new, max_new_tokens=max_new, eos_token_ids=eos_token_ids):
        accepted, _ = greedy_accept(c[committed : committed + B], list(drafts[committed - 1]))
        stats.observe_draft(accepted)
        committed, new = committed + accepted + 1, accepted + 1
    stats.new_tokens = len(
        returned_tokens(c[:committed], max_new_tokens=max_new, eos_token_ids=eos_token_ids)
    )
    return stats


# --------------------------------------------------------------------------------------------
# The drafts: every possible round at once, in rows shaped like the training rows
# --------------------------------------------------------------------------------------------


@dataclass
class DraftRow:
    """One row of a drafting forward: whole sequences packed in order, and up to max_anchors anchors."""

    sequences: list[int]  # indices into the caller's sequence list, in row order
    anchors: list[tuple[int, int, int]] = field(default_factory=list)  # (row position, sequence, round j-1)


def plan_draft_rows(
    lengths: Sequence[int], *, anchors: Sequence[int], total_seq_len: int, max_anchors: int
) -> list[DraftRow]:
    """Pack sequences (row lengths `lengths`) into rows of total_seq_len and split their anchors
    (`anchors[i]` rounds for sequence i) into rows of at most max_anchors; a pure function of its
    arguments, so every rank can count every rank's forwards."""
    rows: list[DraftRow] = []
    for packed in plan_rows(list(lengths), total_seq_len):
        offset, all_anchors = 0, []
        for i in packed:
            start = offset + lengths[i] - anchors[i]  # the first anchor sits right after the prompt
            all_anchors += [(start + r, i, r) for r in range(anchors[i])]
            offset += lengths[i]
        for first in range(0, len(all_anchors), max_anchors):
            rows.append(DraftRow(sequences=list(packed), anchors=all_anchors[first : first + max_anchors]))
    return rows


def batch_of(
    rows: Sequence[DraftRow],
    sequences: Sequence[EvalSequence],
    *,
    total_seq_len: int,
    max_anchors: int,
    hidden_dtype: torch.dtype | None,
) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """(batch on the CPU, anchors [R, max_anchors], anchor_valid) for `rows`; padding: anchor 0, invalid."""
    pieces = []
    for row in rows:
        pieces.append([])
        for i in row.sequences:
            sequence = sequences[i]
            if sequence.aux is None:
                raise RuntimeError("an eval sequence has no hidden states yet")
            ids = torch.tensor(sequence.row_ids, dtype=torch.long)
            pieces[-1].append(
                SamplePiece(
                    input_ids=ids,
                    loss_mask=torch.zeros_like(ids, dtype=torch.bool),  # nothing is trained
                    aux_hidden_states=sequence.aux.to(hidden_dtype or sequence.aux.dtype),
                    last_hidden_states=sequence.aux.new_zeros(len(ids), 0),  # no targets needed
                )
            )
    batch = collate(pieces, total_seq_len=total_seq_len)
    anchors = torch.zeros(len(rows), max_anchors, dtype=torch.long)
    valid = torch.zeros(len(rows), max_anchors, dtype=torch.bool)
    for b, row in enumerate(rows):
        anchors[b, : len(row.anchors)] = torch.tensor([position for position, _, _ in row.anchors])
        valid[b, : len(row.anchors)] = True
    return batch, anchors, valid


@torch.no_grad()
def draft_at_anchors(
    drafter: DFlashDrafter,
    heads: VerifierHeads,
    batch: PackedBatch,
    *,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    attention: AttentionKind,
) -> torch.Tensor:
    """The drafter's greedy proposals [R, N, B-1] (verifier ids) for the blocks at `anchors` [R, N].

    One drafter forward (collective under FSDP: every rank must call it the same number of times);
    the logits are computed a chunk of slots at a time and only their argmax is kept.
    """
    B = drafter.config.block_size
    R, N = anchors.shape
    _, _, out = draft_blocks(
        drafter, heads, batch, anchors=anchors, anchor_valid=anchor_valid, attention=attention
    )
    hidden = out.hidden.view(R, N, B, -1)[:, :, 1:].reshape(R * N * (B - 1), -1)  # slot 0 drafts nothing
    ids = torch.cat(
        [
            drafter.compute_logits(hidden[i : i + LOGIT_CHUNK_SLOTS], verifier_lm_head=heads.lm_head).argmax(
                -1
            )
            for i in range(0, hidden.shape[0], LOGIT_CHUNK_SLOTS)
        ]
    )
    return drafter.draft_to_target_ids(ids).view(R, N, B - 1)
