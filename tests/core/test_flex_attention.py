"""Compiled flex_attention (the CUDA training path) == SDPA with a dense mask, at a realistic shape.

fp32 with TF32 off, so both paths do the same arithmetic up to summation order. Tolerance:
atol 1e-3 on logits (|logits| up to ~30 here) and on the loss, rtol 1e-3 / atol 1e-5 on gradients;
measured max-abs differences are printed (`pytest -s`). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from dflash_core.anchors import sample_anchors
from dflash_core.batch import PackedBatch
from dflash_core.loss import LossConfig
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import dflash_forward

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HIDDEN, VOCAB, T, ANCHORS, BLOCK = 1024, 8192, 2048, 64, 16


def _parts(layer_types: list[str], *, non_causal: bool, device: torch.device):
    config = DrafterConfig(
        hidden_size=HIDDEN, intermediate_size=3072, num_hidden_layers=len(layer_types),
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
        layer_types=layer_types, sliding_window=512, sliding_window_non_causal=non_causal,
        block_size=BLOCK, aux_hidden_state_layer_ids=[1, 14, 27], mask_token_id=VOCAB - 1,
        vocab_size=VOCAB, draft_vocab_size=VOCAB,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    drafter, heads = DFlashDrafter(config), VerifierHeads(vocab_size=VOCAB, hidden_size=HIDDEN, eps=1e-6)
    with torch.no_grad():
        for module in (drafter, heads):
            for name, p in module.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    doc_lengths = [700, 300, 600, 448]  # four packed documents filling the row
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lengths)]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths]).unsqueeze(0)
    batch = PackedBatch(
        input_ids=torch.randint(0, VOCAB - 1, (1, T), generator=gen),
        loss_mask=torch.rand(1, T, generator=gen) < 0.8,
        document_ids=document_ids,
        position_ids=position_ids,
        aux_hidden_states=torch.randn(1, T, 3 * HIDDEN, generator=gen),
        last_hidden_states=4 * torch.randn(1, T, HIDDEN, generator=gen),
    )
    anchors, valid = sample_anchors(batch.loss_mask, batch.document_ids, max_anchors=ANCHORS, generator=gen)
    return drafter.to(device), heads.to(device), batch.to(device), anchors.to(device), valid.to(device)


@pytest.mark.parametrize(
    ("layer_types", "non_causal"),
    [(["sliding_attention"] * 2, False), (["full_attention"] * 2, True)],
    ids=["sliding-causal", "full-bidirectional"],
)
def test_compiled_flex_matches_sdpa(layer_types: list[str], non_causal: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    drafter, heads, batch, anchors, valid = _parts(layer_types, non_causal=non_causal, device=device)
    results = {}
    for attention in ("sdpa", "flex"):
        drafter.zero_grad(set_to_none=True)
        out = dflash_forward(
            drafter, heads, batch, anchors=anchors, anchor_valid=valid, loss_config=LossConfig(gamma=7.0),
            attention=attention, keep_intermediates=True,
        )  # fmt: skip
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in drafter.named_parameters() if p.grad is not None}
        results[attention] = (out, grads)
    (sdpa, g_sdpa), (flex, g_flex) = results["sdpa"], results["flex"]
    logit_diff = (flex.draft_logits - sdpa.draft_logits).abs().max().item()
    loss_diff = abs(flex.loss.item() - sdpa.loss.item())
    grad_diff = max((g_flex[n] - g_sdpa[n]).abs().max().item() for n in g_sdpa)
    print(
        f"\n[{'-'.join(layer_types)}] flex vs sdpa max|diff|: logits {logit_diff:.3e} "
        f"(max|logit| {sdpa.draft_logits.abs().max().item():.1f}), loss {loss_diff:.3e}, "
        f"grads {grad_diff:.3e}; loss {sdpa.loss.item():.4f}, eal {sdpa.eal.item():.3f}, "
        f"supervised slots {int(sdpa.total_per_pos.sum())}"
    )
    assert g_sdpa.keys() == g_flex.keys() and "fc.weight" in g_sdpa
    torch.testing.assert_close(flex.draft_logits, sdpa.draft_logits, rtol=0, atol=1e-3)
    assert loss_diff < 1e-3
    for name in g_sdpa:
        torch.testing.assert_close(g_flex[name], g_sdpa[name], rtol=1e-3, atol=1e-5, msg=name)
    # identical supervision; argmax agreement is not asserted slot by slot (near-ties may flip)
    assert torch.equal(flex.slot_loss_mask, sdpa.slot_loss_mask)
