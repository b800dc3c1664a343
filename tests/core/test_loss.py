"""Slot weights, the weighted loss, accuracy/acceptance metrics, and reduced-vocab targets, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dflash_core.batch import PackedBatch
from dflash_core.loss import (
    LossConfig,
    dpace_weights,
    exp_decay_weights,
    kl_per_slot,
    slot_metrics,
    uniform_weights,
    weighted_loss,
)
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import dflash_forward


def test_exp_decay_values() -> None:
    w = exp_decay_weights(4, gamma=4.0)
    expected = [0.0, 1.0, math.exp(-0.25), math.exp(-0.5)]
    assert w.tolist() == pytest.approx(expected, abs=1e-7)
    assert exp_decay_weights(16, gamma=7.0)[15].item() == pytest.approx(math.exp(-2.0), abs=1e-7)
    assert uniform_weights(3).tolist() == [0.0, 1.0, 1.0]


def test_dpace_formula_by_hand() -> None:
    ce = torch.tensor([[0.5, 1.0, 2.0, 0.3]])
    mask = torch.tensor([[False, True, False, True]])
    s1 = 0.5 * math.exp(-1.0) + 0.5
    s3 = 0.5 * math.exp(-0.3) + 0.5
    w = dpace_weights(ce, mask, alpha=0.5)
    assert w[0].tolist() == pytest.approx([0.0, s1 + s1 * s3, 0.0, s1 * s3], abs=1e-6)
    assert not w.requires_grad


def test_dpace_alpha_one_counts_supervised_slots_after() -> None:
    """alpha = 1: every s_k = 1, so w_k = number of supervised slots at or after k (mask-only)."""
    ce = torch.rand(1, 2, 5)
    mask = torch.tensor([[[False, True, True, False, True], [False, False, True, True, True]]])
    w = dpace_weights(ce, mask, alpha=1.0)
    assert w.tolist() == [[[0, 3, 2, 0, 1], [0, 0, 3, 2, 1]]]


def test_weighted_loss_divides_by_supervised_count_not_weights() -> None:
    per_slot = torch.tensor([[9.0, 2.0, 4.0, 100.0]])
    mask = torch.tensor([[False, True, True, False]])
    weights = torch.tensor([[0.0, 1.0, 0.5, 1.0]])
    assert weighted_loss(per_slot, mask=mask, weights=weights).item() == pytest.approx(4.0 / (2 + 1e-5))


def test_acceptance_length_masked_slot_ends_the_run() -> None:
    # 3 blocks of 4 slots (slot 0 = anchor)
    correct = torch.tensor([[True, True, True, True], [True, True, True, True], [True, True, False, True]])
    supervised = torch.tensor(
        [[False, True, False, True], [False, True, True, True], [False, False, False, False]]
    )
    m = slot_metrics(correct.view(1, 3, 4), supervised.view(1, 3, 4))
    # block 0: slot 2 is correct but unsupervised -> run stops at 1; block 2 has nothing supervised.
    assert m.accepted_len_per_block.tolist() == [[2.0, 4.0, 1.0]]
    assert m.block_valid.tolist() == [[True, True, False]]
    assert (m.eal_sum.item(), m.eal_total.item(), m.eal.item()) == (6.0, 2.0, 3.0)
    assert m.correct_per_pos.tolist() == [0.0, 2.0, 1.0, 2.0]
    assert m.total_per_pos.tolist() == [0.0, 2.0, 1.0, 2.0]
    assert m.full_acc.item() == 1.0


def test_incorrect_slot_ends_the_run_and_accuracy_counts() -> None:
    correct = torch.tensor([[[False, False, True, True], [True, True, False, True]]])
    supervised = torch.tensor([[[False, True, True, True], [False, True, True, True]]])
    m = slot_metrics(correct, supervised)
    assert m.accepted_len_per_block.tolist() == [[1.0, 2.0]]
    assert m.position_acc.tolist() == [0.5, 0.5, 1.0]
    assert m.full_acc.item() == pytest.approx(4 / 6)


def test_kl_per_slot() -> None:
    gen = torch.Generator().manual_seed(0)
    d, t = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    p = t.softmax(-1)
    manual = (p * (p.log() - d.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl_per_slot(d, t), manual)
    assert kl_per_slot(t, t).abs().max().item() < 1e-6


def test_loss_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="weighting"):
        LossConfig(weighting="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma"):
        LossConfig(gamma=0.0)


# ------------------------------------------------------------------- reduced draft vocab

V, D, HID, MASK_ID = 10, 4, 16, 9
DRAFT_TO_TARGET = [1, 3, 4, 8]  # the draft vocab, as verifier ids


def _reduced_vocab_parts() -> tuple[DFlashDrafter, VerifierHeads]:
    config = DrafterConfig(
        hidden_size=HID, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, block_size=4, aux_hidden_state_layer_ids=[1],
        mask_token_id=MASK_ID, vocab_size=V, draft_vocab_size=D,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.zeros(V, HID)
    lm_head[:, :V] = 10 * torch.eye(V)  # verifier argmax at row r = the coordinate r's hidden state points at
    heads = VerifierHeads.from_tensors(
        embed=torch.randn(V, HID, generator=gen), lm_head=lm_head, norm=torch.ones(HID), eps=1e-6
    )
    drafter = DFlashDrafter(config)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[DRAFT_TO_TARGET] = True
    d2t = torch.tensor(DRAFT_TO_TARGET) - torch.arange(D)  # offsets: target = i + d2t[i]
    drafter.set_draft_vocab(d2t=d2t, t2d=t2d, verifier_lm_head=heads.lm_head.weight)
    return drafter, heads


def test_draft_vocab_mapping() -> None:
    drafter, heads = _reduced_vocab_parts()
    assert drafter.d2t.tolist() == [1, 2, 2, 5]
    assert drafter.draft_to_target_ids(torch.arange(D)).tolist() == DRAFT_TO_TARGET
    ids, in_vocab = drafter.target_to_draft_ids(torch.tensor([3, 8, 0, 4, 1]))
    assert in_vocab.tolist() == [True, True, False, True, True]
    assert ids[in_vocab].tolist() == [1, 3, 2, 0]
    assert torch.equal(drafter.lm_head.weight, heads.lm_head.weight[DRAFT_TO_TARGET])
    assert not drafter.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="disagree"):
        drafter.set_draft_vocab(
            d2t=torch.zeros(D, dtype=torch.long), t2d=drafter.t2d, verifier_lm_head=heads.lm_head.weight
        )


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_reduced_vocab_targets_outside_the_draft_vocab(kind: str) -> None:
    """A target outside the draft vocab: no CE loss, but supervised and wrong in the metrics."""
    drafter, heads = _reduced_vocab_parts()
    T = 8
    # Verifier prediction at row r (slot k of anchor a reads row a+k-1): 0 is not in the draft vocab.
    predicted = [3, 8, 0, 4, 1, 4, 3, 8]
    last = torch.zeros(1, T, HID)
    last[0, torch.arange(T), torch.tensor(predicted)] = 1.0
    batch = PackedBatch(
        input_ids=torch.tensor([[2, 5, 6, 7, 1, 2, 3, 4]]),
        loss_mask=torch.ones(1, T, dtype=torch.bool),
        document_ids=torch.zeros(1, T, dtype=torch.long),
        position_ids=torch.arange(T).unsqueeze(0),
        aux_hidden_states=torch.randn(1, T, HID, generator=torch.Generator().manual_seed(1)),
        last_hidden_states=last,
    )
    anchors = torch.tensor([[1, 4]])
    out = dflash_forward(
        drafter, heads, batch, anchors=anchors, anchor_valid=torch.ones_like(anchors, dtype=torch.bool),
        loss_config=LossConfig(kind=kind, weighting="uniform"), keep_intermediates=True,
    )  # fmt: skip
    # slots: anchor 1 -> target rows 0..3 = [3, 8, 0, 4]; anchor 4 -> rows 3..6 = [4, 1, 4, 3]
    assert out.target_ids.tolist() == [[3, 8, 0, 4, 4, 1, 4, 3]]
    assert out.draft_logits.shape == (1, 8, D)
    supervised = torch.tensor([[False, True, True, True, False, True, True, True]])
    assert torch.equal(out.slot_loss_mask, supervised)
    assert out.total_per_pos.tolist() == [0.0, 2.0, 2.0, 2.0]  # the out-of-vocab slot (k=2 of block 0) counts
    draft_as_target = torch.tensor(DRAFT_TO_TARGET)[out.draft_logits.argmax(-1)]
    assert torch.equal(out.draft_ids, draft_as_target)
    assert out.correct_per_pos[2] == float(
        draft_as_target[0, 6] == 4
    )  # block 0 slot 2 (target 0) never correct
    logits = out.draft_logits[0].detach()
    if kind == "ce":
        label = {1: 0, 3: 1, 4: 2, 8: 3}
        trained = [q for q in range(8) if supervised[0, q] and out.target_ids[0, q].item() in label]
        assert trained == [1, 3, 5, 6, 7]  # q = 2 (target 0) is supervised but not trained
        ce = [F.cross_entropy(logits[q], torch.tensor(label[out.target_ids[0, q].item()])) for q in trained]
        assert out.loss.item() == pytest.approx(float(sum(ce)) / (len(trained) + 1e-5), rel=1e-5)
    else:
        restricted = out.target_logits[0][:, DRAFT_TO_TARGET]  # verifier over the draft vocab only
        kl = kl_per_slot(logits, restricted)
        torch.testing.assert_close(out.kl_per_slot[0], kl)
        assert out.loss.item() == pytest.approx(float(kl[supervised[0]].sum()) / (6 + 1e-5), rel=1e-5)
    out.loss.backward()
    assert drafter.fc.weight.grad is not None and drafter.lm_head.weight.grad is None
