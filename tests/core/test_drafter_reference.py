"""The batched training forward equals a naive per-block reference.

The reference runs every block on its own: it lists the block's visible context rows with a
Python loop over the row, then runs plain per-head attention (explicit softmax) over exactly
those rows plus the block's slots, with its own RMSNorm and RoPE (pairs i, i + D/2). It shares
nothing with the batched code but the weights. Everything runs in float64; the one float32 step
on our side is the RoPE angle table (positions < 64 here, so ~1e-6 relative at worst), hence the
stated tolerance: atol 1e-5 on hidden states and logits (values are O(1)-O(10)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dflash_core.anchors import sample_anchors
from dflash_core.batch import PackedBatch, SamplePiece, collate
from dflash_core.loss import LossConfig
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import dflash_forward

ATOL = 1e-5
H, V, K, BLOCK, MASK_ID = 64, 50, 2, 4, 49


def _config(layer_types: list[str], *, window: int | None, non_causal: bool) -> DrafterConfig:
    return DrafterConfig(
        hidden_size=H,
        intermediate_size=96,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head
        head_dim=16,
        rope_theta=10000.0,
        layer_types=layer_types,
        sliding_window=window,
        sliding_window_non_causal=non_causal,
        block_size=BLOCK,
        aux_hidden_state_layer_ids=[1, 3],
        mask_token_id=MASK_ID,
        vocab_size=V,
        draft_vocab_size=V,
    )


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights AND norm gains (a swapped or skipped norm must change the output)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)


def _batch(generator: torch.Generator) -> PackedBatch:
    def piece(t: int) -> SamplePiece:
        return SamplePiece(
            input_ids=torch.randint(0, MASK_ID, (t,), generator=generator),
            loss_mask=torch.rand(t, generator=generator) < 0.75,
            aux_hidden_states=torch.randn(t, K * H, generator=generator),
            last_hidden_states=3 * torch.randn(t, H, generator=generator),
        )

    # Row 0: three documents and 7 padding rows; row 1: two documents filling the row.
    return collate([[piece(13), piece(9), piece(11)], [piece(25), piece(15)]], total_seq_len=40)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """x [L, D]; rotates the pairs (i, i + D/2) by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    half = D // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / D))
    ang = torch.tensor(positions, dtype=torch.float64)[:, None] * inv  # [L, half]
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), dim=-1)


def _reference_block(
    w: dict[str, torch.Tensor],
    config: DrafterConfig,
    *,
    heads: VerifierHeads,
    batch: PackedBatch,
    b: int,
    a: int,
) -> dict[str, torch.Tensor]:
    """One block (row b, anchor a) computed on its own."""
    T = batch.input_ids.shape[1]
    doc, pos = batch.document_ids[b].tolist(), batch.position_ids[b].tolist()
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    ctx_all = _rms(batch.aux_hidden_states[b] @ w["fc.weight"].T, w["hidden_norm.weight"])
    ids = [int(batch.input_ids[b, a])] + [MASK_ID] * (BLOCK - 1)
    x = heads.embed_tokens.weight[ids]  # [BLOCK, H]
    block_pos = [pos[a] + k for k in range(BLOCK)]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        window, causal = config.layer_window(i), config.layer_is_causal_in_block(i)
        rows = [
            c for c in range(T) if doc[c] == doc[a] != -1 and c < a and (window is None or c >= a - window)
        ]
        ctx = ctx_all[rows]
        h = _rms(x, w[p + "input_layernorm.weight"])
        out_heads = []
        for head in range(nh):
            kv = head // (nh // nkv)
            qs, ks = slice(head * hd, (head + 1) * hd), slice(kv * hd, (kv + 1) * hd)
            q = _rope(
                _rms(h @ w[p + "self_attn.q_proj.weight"][qs].T, w[p + "self_attn.q_norm.weight"]), block_pos
            )
            kw, vw, kn = (
                w[p + "self_attn.k_proj.weight"][ks],
                w[p + "self_attn.v_proj.weight"][ks],
                w[p + "self_attn.k_norm.weight"],
            )
            k_all = torch.cat(
                (_rope(_rms(ctx @ kw.T, kn), [pos[c] for c in rows]), _rope(_rms(h @ kw.T, kn), block_pos))
            )
            v_all = torch.cat((ctx @ vw.T, h @ vw.T))
            scores = q @ k_all.T / hd**0.5  # [BLOCK, len(rows) + BLOCK]
            if causal:
                future = torch.ones(BLOCK, BLOCK, dtype=torch.bool).triu(1)
                scores[:, len(rows) :] = scores[:, len(rows) :].masked_fill(future, float("-inf"))
            out_heads.append(scores.softmax(-1) @ v_all)
        x = x + torch.cat(out_heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        m = _rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    hidden = _rms(x, w["norm.weight"])
    logits = hidden @ heads.lm_head.weight.T
    target_rows = [(a + k - 1) % T for k in range(BLOCK)]
    target_logits = _rms(batch.last_hidden_states[b, target_rows], heads.norm.weight) @ heads.lm_head.weight.T
    supervised = [
        k >= 1 and a + k < T and doc[a + k] == doc[a] and bool(batch.loss_mask[b, a + k])
        for k in range(BLOCK)
    ]
    return {
        "hidden": hidden,
        "logits": logits,
        "target_ids": target_logits.argmax(-1),
        "mask": torch.tensor(supervised),
    }


CASES = {
    "sliding-causal": (["sliding_attention"] * 3, 5, False),
    "full-bidirectional": (["full_attention"] * 3, None, True),
    "mixed-noncausal": (["sliding_attention", "full_attention", "sliding_attention"], 3, True),
    "full-causal-flag-ignored": (["full_attention"] * 2, None, False),  # full layers are bidirectional anyway
}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_forward_equals_per_block_reference(case: str, attention: str) -> None:
    layer_types, window, non_causal = CASES[case]
    config = _config(layer_types, window=window, non_causal=non_causal)
    gen = torch.Generator().manual_seed(0)
    drafter = DFlashDrafter(config)
    _randomize(drafter, gen)
    heads = VerifierHeads(vocab_size=V, hidden_size=H, eps=1e-6)
    _randomize(heads, gen)
    batch = _batch(gen)
    anchors, valid = sample_anchors(batch.loss_mask, batch.document_ids, max_anchors=30, generator=gen)
    assert bool((~valid).any()), "row 0 has fewer eligible anchors than row 1: padding must be exercised"
    drafter, heads = drafter.double(), heads.double()
    batch.aux_hidden_states = batch.aux_hidden_states.double()
    batch.last_hidden_states = batch.last_hidden_states.double()
    with torch.no_grad():
        out = dflash_forward(
            drafter, heads, batch, anchors=anchors, anchor_valid=valid,
            loss_config=LossConfig(weighting="uniform"), attention=attention, keep_intermediates=True,
        )  # fmt: skip
    weights = drafter.state_dict()
    ce_sum, mask_sum, checked = 0.0, 0, 0
    for b in range(anchors.shape[0]):
        for j in range(anchors.shape[1]):
            sl = slice(j * BLOCK, (j + 1) * BLOCK)
            if not valid[b, j]:
                assert not out.slot_loss_mask[b, sl].any()
                continue
            ref = _reference_block(weights, config, heads=heads, batch=batch, b=b, a=int(anchors[b, j]))
            torch.testing.assert_close(out.draft_hidden[b, sl], ref["hidden"], rtol=0, atol=ATOL)
            torch.testing.assert_close(out.draft_logits[b, sl], ref["logits"], rtol=0, atol=ATOL)
            assert torch.equal(out.target_ids[b, sl], ref["target_ids"])
            assert torch.equal(out.slot_loss_mask[b, sl], ref["mask"]), (b, int(anchors[b, j]))
            ce = F.cross_entropy(ref["logits"], ref["target_ids"], reduction="none")
            ce_sum += float((ce * ref["mask"]).sum())
            mask_sum += int(ref["mask"].sum())
            checked += 1
    assert checked >= 25  # both rows, many blocks, several crossing a document or the row end
    assert abs(float(out.loss) - ce_sum / (mask_sum + 1e-5)) < 1e-6


@pytest.mark.parametrize("max_anchors", [4, 20], ids=["fewer-slots-than-rows", "more-slots-than-rows"])
def test_lean_training_forward_equals_the_instrumented_one(max_anchors: int) -> None:
    """Training drops intermediates and, when blocks outnumber rows, takes targets per row: same result."""
    generator = torch.Generator().manual_seed(3)
    drafter = DFlashDrafter(_config(["full_attention"] * 2, window=None, non_causal=True))
    heads = VerifierHeads(vocab_size=V, hidden_size=H, eps=1e-6)
    _randomize(drafter, generator)
    _randomize(heads, generator)
    batch = _batch(generator)
    anchors, valid = sample_anchors(
        batch.loss_mask, batch.document_ids, max_anchors=max_anchors, generator=generator
    )
    assert (anchors.shape[1] * BLOCK > batch.input_ids.shape[1]) == (max_anchors == 20)
    outs = [
        dflash_forward(
            drafter,
            heads,
            batch,
            anchors=anchors,
            anchor_valid=valid,
            loss_config=LossConfig(gamma=4.0),
            keep_intermediates=keep,
        )
        for keep in (True, False)
    ]
    assert torch.equal(outs[0].target_ids, outs[1].target_ids)
    assert torch.equal(outs[0].correct_per_pos, outs[1].correct_per_pos)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=0, atol=1e-6)
