"""One DFlash training forward: blocks -> masks -> drafter -> logits -> targets -> loss and metrics.

`dflash_forward` is what the trainer calls every step (and the oracle test calls once): it lays
out the blocks at the given anchors, embeds them with the verifier's frozen embedding, builds one
mask per kind of layer, runs the drafter, and compares its logits with the verifier's greedy
predictions (`lm_head(norm(h_N))` at row a+k-1 for slot k, under no_grad).

Outputs are named like the tensors of testvectors/dflash (README "Expected outputs"), with a
leading batch dim: per-slot [B, Q] (Q = N * block_size), per-block [B, N], per-position [block_size].
The big intermediates (logits, hidden states, masks) are kept only with `keep_intermediates`.

Softmax/CE/KL run in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from dflash_core.anchors import Blocks, build_blocks
from dflash_core.batch import PackedBatch
from dflash_core.loss import (
    LossConfig,
    SlotMetrics,
    cross_entropy_per_slot,
    kl_per_slot,
    slot_metrics,
    slot_weights,
    weighted_loss,
)
from dflash_core.masks import BlockVisibility, dense_mask, flex_block_mask
from dflash_core.model.attention import AttentionMask
from dflash_core.model.drafter import DFlashDrafter, DrafterOutput
from dflash_core.model.verifier_heads import VerifierHeads

AttentionKind = Literal["sdpa", "flex"]


@dataclass
class DFlashOutput:
    loss: torch.Tensor  # [] float32
    loss_count: torch.Tensor  # [] float32: slots in the loss (the mean's denominator, before its eps)
    # --- metrics (device tensors; see dflash_core.loss.SlotMetrics) ---
    correct_per_pos: torch.Tensor  # [block_size]
    total_per_pos: torch.Tensor  # [block_size]
    position_acc: torch.Tensor  # [block_size - 1]
    full_acc_sum: torch.Tensor
    full_acc_total: torch.Tensor
    full_acc: torch.Tensor
    accepted_len_per_block: torch.Tensor  # [B, N]
    block_valid: torch.Tensor  # [B, N]
    eal_sum: torch.Tensor
    eal_total: torch.Tensor
    eal: torch.Tensor
    # --- per slot [B, Q] ---
    slot_loss_mask: torch.Tensor  # supervised slots (loss or, for an out-of-draft-vocab target, metrics only)
    loss_per_slot: torch.Tensor  # CE or KL per slot, unmasked, float32
    slot_weight: torch.Tensor  # weight of each slot in the loss
    draft_ids: torch.Tensor  # the drafter's argmax, as VERIFIER ids (mapped through d2t with a reduced vocab)
    target_ids: torch.Tensor  # the verifier's argmax over its FULL vocab
    ce_per_slot: torch.Tensor | None = None  # == loss_per_slot when loss kind is "ce"
    kl_per_slot: torch.Tensor | None = None  # == loss_per_slot when loss kind is "kl"
    weight_exp_decay: torch.Tensor | None = None
    weight_dpace: torch.Tensor | None = None
    # --- big intermediates (keep_intermediates=True only) ---
    anchors: torch.Tensor | None = None  # [B, N]
    anchor_valid: torch.Tensor | None = None
    block_base_index: torch.Tensor | None = None  # [B, Q]
    block_position_ids: torch.Tensor | None = None
    draft_input_ids: torch.Tensor | None = None
    target_index: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None  # [B, Q, T+Q], layer 0's mask
    context_fc_normed: torch.Tensor | None = None  # [B, T, H]
    layer_outputs: list[torch.Tensor] | None = None  # [B, Q, H] per layer, before the final norm
    draft_hidden: torch.Tensor | None = None  # [B, Q, H]
    draft_logits: torch.Tensor | None = None  # [B, Q, D]
    target_logits: torch.Tensor | None = None  # [B, Q, V]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is set, by name (layer outputs as layer_out_{i})."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        for i, x in enumerate(self.layer_outputs or []):
            out[f"layer_out_{i}"] = x
        return out


def build_layer_masks(
    drafter: DFlashDrafter, *, blocks: Blocks, document_ids: torch.Tensor, attention: AttentionKind
) -> list[AttentionMask]:
    """One mask per layer; layers with the same (window, causal) share one object."""
    config = drafter.config
    cache: dict[tuple[int | None, bool], AttentionMask] = {}
    masks = []
    for i in range(config.num_hidden_layers):
        key = (config.layer_window(i), config.layer_is_causal_in_block(i))
        if key not in cache:
            visibility = BlockVisibility(
                anchors=blocks.anchors,
                anchor_valid=blocks.anchor_valid,
                document_ids=document_ids,
                block_size=blocks.block_size,
                window=key[0],
                causal=key[1],
            )
            cache[key] = dense_mask(visibility) if attention == "sdpa" else flex_block_mask(visibility)
        masks.append(cache[key])
    return masks


def draft_blocks(
    drafter: DFlashDrafter,
    heads: VerifierHeads,
    batch: PackedBatch,
    *,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    attention: AttentionKind = "sdpa",
    return_layer_outputs: bool = False,
) -> tuple[Blocks, list[AttentionMask], DrafterOutput]:
    """The drafter over every block of `batch` at `anchors` [B, N] in one forward (no targets, no loss).

    Slot 0 of a block holds the token at its anchor, slots 1.. the mask token, at positions that
    continue the anchor's; a block sees the context rows before its anchor (same document) and
    itself. Training (`dflash_forward`) and live acceptance (`dflash_core.live_acceptance`) both
    draft through here, so what is measured is what is trained.
    """
    config = drafter.config
    blocks = build_blocks(
        input_ids=batch.input_ids,
        loss_mask=batch.loss_mask,
        document_ids=batch.document_ids,
        position_ids=batch.position_ids,
        anchors=anchors,
        anchor_valid=anchor_valid,
        block_size=config.block_size,
        mask_token_id=config.mask_token_id,
    )
    masks = build_layer_masks(drafter, blocks=blocks, document_ids=batch.document_ids, attention=attention)
    out = drafter(
        block_embeds=heads.embed(blocks.input_ids),  # [B, Q, H], frozen
        aux_hidden_states=batch.aux_hidden_states,
        block_position_ids=blocks.position_ids,
        context_position_ids=batch.position_ids,
        masks=masks,
        return_layer_outputs=return_layer_outputs,
    )
    return blocks, masks, out


def dflash_forward(
    drafter: DFlashDrafter,
    heads: VerifierHeads,
    batch: PackedBatch,
    *,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    loss_config: LossConfig,
    attention: AttentionKind = "sdpa",
    keep_intermediates: bool = False,
) -> DFlashOutput:
    """The training forward over all blocks of `batch` at `anchors` [B, N] (sorted; padding: anchor_valid)."""
    config = drafter.config
    if heads.hidden_size != config.hidden_size:
        raise ValueError(
            f"the verifier embeds into {heads.hidden_size} dims but the drafter is {config.hidden_size} "
            "wide; DFlash drafters share the verifier's hidden size"
        )
    B = batch.input_ids.shape[0]
    N, bs = anchors.shape[1], config.block_size

    # 1-2. blocks at the anchors, then the drafter over all of them at once
    blocks, masks, out = draft_blocks(
        drafter,
        heads,
        batch,
        anchors=anchors,
        anchor_valid=anchor_valid,
        attention=attention,
        return_layer_outputs=keep_intermediates,
    )
    draft_logits = drafter.compute_logits(out.hidden, verifier_lm_head=heads.lm_head)  # [B, Q, D]

    # 3. targets: the verifier's greedy next token at row a+k-1, over its FULL vocab
    keep_target_logits = keep_intermediates or loss_config.kind == "kl"
    with torch.no_grad():
        if keep_target_logits or blocks.target_index.shape[1] < batch.last_hidden_states.shape[1]:
            index = blocks.target_index.unsqueeze(-1).expand(-1, -1, batch.last_hidden_states.shape[-1])
            target_logits = heads.target_logits(torch.gather(batch.last_hidden_states, 1, index))  # [B,Q,V]
            target_ids = target_logits.argmax(-1)
        else:
            # More slots than rows (blocks overlap): the LM head once per row is cheaper; same argmax.
            row_ids = heads.target_logits(batch.last_hidden_states).argmax(-1)  # [B, T]
            target_ids = torch.gather(row_ids, 1, blocks.target_index)
        target_draft_ids, in_draft_vocab = drafter.target_to_draft_ids(target_ids)
    if not keep_target_logits:
        target_logits = None  # [B, Q, V]: free it before the float32 CE doubles the logits' memory

    # 4. per-slot loss. A target outside the draft vocab cannot be drafted: no loss for it, but it
    # still counts (as wrong) in accuracy and acceptance below, so the metrics stay honest.
    supervised = blocks.loss_mask  # [B, Q]
    if loss_config.kind == "ce":
        loss_mask = supervised & in_draft_vocab
        per_slot = cross_entropy_per_slot(draft_logits, target_draft_ids)
    else:
        loss_mask = supervised
        restricted = (
            target_logits if drafter.lm_head is None else target_logits[..., _draft_vocab_ids(drafter)]
        )
        per_slot = kl_per_slot(draft_logits, restricted)
    weights = slot_weights(
        loss_config, per_slot=per_slot.view(B, N, bs).detach(), mask=loss_mask.view(B, N, bs)
    ).reshape(B, N * bs)
    loss = weighted_loss(per_slot, mask=loss_mask, weights=weights)

    # 5. metrics: a slot is correct iff the drafter's argmax IS the verifier's token
    with torch.no_grad():
        draft_ids = drafter.draft_to_target_ids(draft_logits.argmax(-1))
        metrics: SlotMetrics = slot_metrics(
            (draft_ids == target_ids).view(B, N, bs), supervised.view(B, N, bs)
        )

    result = DFlashOutput(
        loss=loss,
        loss_count=loss_mask.float().sum().detach(),
        **{f.name: getattr(metrics, f.name) for f in fields(SlotMetrics)},
        slot_loss_mask=supervised,
        loss_per_slot=per_slot,
        slot_weight=weights,
        draft_ids=draft_ids,
        target_ids=target_ids,
        ce_per_slot=per_slot if loss_config.kind == "ce" else None,
        kl_per_slot=per_slot if loss_config.kind == "kl" else None,
        weight_exp_decay=weights if loss_config.weighting == "exp_decay" else None,
        weight_dpace=weights if loss_config.weighting == "dpace" else None,
    )
    if keep_intermediates:
        result.anchors, result.anchor_valid = anchors, anchor_valid
        result.block_base_index = blocks.base_index
        result.block_position_ids = blocks.position_ids
        result.draft_input_ids = blocks.input_ids
        result.target_index = blocks.target_index
        result.attn_mask = masks[0] if attention == "sdpa" else _dense_for_layer0(drafter, blocks, batch)
        result.context_fc_normed = out.context
        result.layer_outputs = out.layer_outputs
        result.draft_hidden = out.hidden
        result.draft_logits = draft_logits
        result.target_logits = target_logits
    return result


def _draft_vocab_ids(drafter: DFlashDrafter) -> torch.Tensor:
    """Verifier ids of the draft vocab, in draft-id order: i + d2t[i]."""
    return torch.arange(drafter.config.draft_vocab_size, device=drafter.d2t.device) + drafter.d2t


def _dense_for_layer0(drafter: DFlashDrafter, blocks: Blocks, batch: PackedBatch) -> torch.Tensor:
    masks = build_layer_masks(drafter, blocks=blocks, document_ids=batch.document_ids, attention="sdpa")
    return masks[0]
