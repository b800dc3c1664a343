"""Draft vocabulary: most frequent ids, d2t OFFSETS and the t2d mask, checked on hand examples."""

from __future__ import annotations

import pytest
import torch

from dflash_core.vocab import (
    DraftVocab,
    build_draft_vocab,
    draft_to_target_ids,
    target_to_draft_ids,
    validate_draft_vocab,
)

FREQ = torch.tensor([5, 0, 3, 3, 0, 9, 1, 0])  # V = 8


def test_hand_example_offsets_and_mask():
    vocab = build_draft_vocab(FREQ, 4)
    # Top 4 by count: id 5 (9), id 0 (5), ids 2 and 3 (3 each); sorted by target id: 0 2 3 5.
    assert vocab.target_ids().tolist() == [0, 2, 3, 5]
    assert vocab.d2t.tolist() == [0, 1, 1, 2]  # target = i + d2t[i]: 0+0, 1+1, 2+1, 3+2
    assert vocab.d2t.dtype == torch.int64
    assert vocab.t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert vocab.t2d.dtype == torch.bool
    assert (vocab.draft_vocab_size, vocab.vocab_size) == (4, 8)


def test_ties_break_by_lower_id():
    assert build_draft_vocab(FREQ, 3).target_ids().tolist() == [0, 2, 5]  # id 2 beats id 3 (both 3)
    assert build_draft_vocab(torch.tensor([1, 1, 1, 1]), 2).target_ids().tolist() == [0, 1]


def test_unseen_ids_fill_up_from_the_lowest():
    vocab = build_draft_vocab(torch.tensor([0, 0, 7, 0, 0, 2]), 4)
    # Seen: 2 and 5; filled with the lowest unseen ids 0 and 1.
    assert vocab.target_ids().tolist() == [0, 1, 2, 5]
    assert vocab.d2t.tolist() == [0, 0, 0, 2]
    assert int(vocab.t2d.sum()) == 4


def test_full_size_draft_vocab_is_identity():
    vocab = build_draft_vocab(FREQ, 8)
    assert vocab.d2t.tolist() == [0] * 8 and bool(vocab.t2d.all())


def test_vocab_size_pads_the_counts():
    vocab = build_draft_vocab(torch.tensor([0, 3]), 3, vocab_size=5)
    assert vocab.vocab_size == 5 and vocab.target_ids().tolist() == [0, 1, 2]


def test_float_counts_work():
    assert build_draft_vocab(FREQ.double() / 2, 2).target_ids().tolist() == [0, 5]


def test_index_maps():
    vocab = build_draft_vocab(FREQ, 4)
    assert draft_to_target_ids(vocab.d2t).tolist() == [0, 2, 3, 5]
    assert target_to_draft_ids(vocab.t2d).tolist() == [0, -1, 1, 2, -1, 3, -1, -1]
    targets = draft_to_target_ids(vocab.d2t)
    assert target_to_draft_ids(vocab.t2d)[targets].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("freq", "size", "message"),
    [
        (FREQ, 9, r"--draft-vocab-size 9 exceeds the verifier vocabulary \(8 tokens\)"),
        (FREQ, 0, "must be a positive int"),
        (FREQ.view(2, 4), 2, r"1-D tensor \[vocab_size\], got \(2, 4\)"),
        (torch.tensor([1, -1]), 1, "negative counts"),
        (torch.tensor([1.0, float("nan")]), 1, "NaN"),
    ],
)
def test_bad_inputs_are_explained(freq, size, message):
    with pytest.raises(ValueError, match=message):
        build_draft_vocab(freq, size)


def test_validation_catches_ids_stored_instead_of_offsets():
    vocab = build_draft_vocab(FREQ, 4)
    validate_draft_vocab(vocab.d2t, vocab.t2d)
    as_ids = vocab.target_ids()  # [0, 2, 3, 5]: what a wrong writer would store
    with pytest.raises(ValueError, match="d2t"):
        validate_draft_vocab(as_ids, vocab.t2d)
    with pytest.raises(ValueError, match="t2d marks 3 tokens but d2t has 4"):
        mask = vocab.t2d.clone()
        mask[5] = False
        validate_draft_vocab(vocab.d2t, mask)
    with pytest.raises(ValueError, match="int64"):
        validate_draft_vocab(vocab.d2t.int(), vocab.t2d)
    with pytest.raises(ValueError, match="bool"):
        validate_draft_vocab(vocab.d2t, vocab.t2d.long())


def test_draft_vocab_is_a_plain_pair():
    vocab = DraftVocab(d2t=torch.tensor([0, 1]), t2d=torch.tensor([True, False, True]))
    assert vocab.target_ids().tolist() == [0, 2]
