"""Anchor eligibility and sampling, and the block layout built at the anchors."""

from __future__ import annotations

import torch

from dflash_core.anchors import build_blocks, eligible_anchors, sample_anchors, trim_anchor_padding

#                             0  1  2  3  4  5  6  7  8   9  10  11
DOCS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, -1, -1, -1]])
LOSS = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)


def test_eligibility_by_hand() -> None:
    # 1, 2: inside doc 0 with the next row supervised; 3: last row of doc 0 (slot 1 would be doc 1);
    # 4: ok; 5: next row has no loss; 6: no loss; 7: ok; 8: last row of doc 2 (next is padding).
    assert eligible_anchors(LOSS, DOCS)[0].nonzero().flatten().tolist() == [1, 2, 4, 7]


def test_never_the_last_row() -> None:
    loss = torch.ones(1, 6, dtype=torch.bool)
    docs = torch.zeros(1, 6, dtype=torch.long)
    assert eligible_anchors(loss, docs)[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_loss_mask_hole_blocks_the_row_before_it() -> None:
    loss = torch.tensor([[1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    docs = torch.zeros(1, 6, dtype=torch.long)
    assert eligible_anchors(loss, docs)[0].nonzero().flatten().tolist() == [0, 1, 4]


def test_takes_all_when_fewer_than_max_sorted_and_padded_per_row() -> None:
    loss = torch.cat((LOSS, torch.ones(1, 12, dtype=torch.bool)))
    docs = torch.cat((DOCS, torch.zeros(1, 12, dtype=torch.long)))
    anchors, valid = sample_anchors(loss, docs, max_anchors=20, generator=torch.Generator().manual_seed(0))
    assert anchors.shape == valid.shape == (2, 11)  # N = the larger per-row count, not max_anchors
    assert anchors[0].tolist() == [1, 2, 4, 7] + [0] * 7
    assert valid[0].tolist() == [True] * 4 + [False] * 7
    assert anchors[1].tolist() == list(range(11)) and bool(valid[1].all())
    padded, padded_valid = sample_anchors(
        loss, docs, max_anchors=20, generator=torch.Generator().manual_seed(0), pad_to_max=True
    )
    assert padded.shape == (2, 20) and int(padded_valid.sum()) == 15


def test_trim_keeps_the_most_valid_anchors_a_row_has_and_at_least_one_column() -> None:
    loss = torch.cat((LOSS, torch.ones(1, 12, dtype=torch.bool)))
    docs = torch.cat((DOCS, torch.zeros(1, 12, dtype=torch.long)))
    generator = torch.Generator().manual_seed(0)
    padded = sample_anchors(loss, docs, max_anchors=20, generator=generator, pad_to_max=True)
    anchors, valid = trim_anchor_padding(*padded)
    assert anchors.shape == valid.shape == (2, 11)
    assert anchors[0].tolist() == [1, 2, 4, 7] + [0] * 7 and int(valid.sum()) == 15
    none_valid = torch.zeros(2, 5, dtype=torch.bool)
    anchors, valid = trim_anchor_padding(torch.zeros(2, 5, dtype=torch.long), none_valid)
    assert anchors.shape == valid.shape == (2, 1) and not valid.any()


def test_no_eligible_anchor_gives_one_invalid_slot() -> None:
    anchors, valid = sample_anchors(
        torch.zeros(1, 8, dtype=torch.bool), torch.zeros(1, 8, dtype=torch.long),
        max_anchors=5, generator=torch.Generator(),
    )  # fmt: skip
    assert anchors.tolist() == [[0]] and valid.tolist() == [[False]]


def test_deterministic_per_generator_and_sorted() -> None:
    loss = torch.ones(2, 200, dtype=torch.bool)
    docs = torch.zeros(2, 200, dtype=torch.long)

    def draw(seed: int) -> torch.Tensor:
        anchors, valid = sample_anchors(
            loss, docs, max_anchors=16, generator=torch.Generator().manual_seed(seed)
        )
        assert bool(valid.all()) and anchors.shape == (2, 16)
        return anchors

    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert bool((a[:, 1:] > a[:, :-1]).all())  # strictly increasing: no repeats
    assert not torch.equal(a[0], a[1])  # rows are drawn independently


def test_uniform_over_eligible_positions() -> None:
    loss = torch.ones(1, 11, dtype=torch.bool)  # rows 0..9 eligible (10 is the row end)
    docs = torch.zeros(1, 11, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(11)
    draws = 3000
    for _ in range(draws):
        anchors, _ = sample_anchors(loss, docs, max_anchors=3, generator=gen)
        counts[anchors[0]] += 1
    assert counts[10] == 0
    expected = draws * 3 / 10
    assert bool(((counts[:10] - expected).abs() < 0.1 * expected).all()), counts.tolist()


def test_build_blocks_by_hand() -> None:
    input_ids = torch.arange(100, 112).unsqueeze(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 0, 0]])
    blocks = build_blocks(
        input_ids=input_ids, loss_mask=LOSS, document_ids=DOCS, position_ids=positions,
        anchors=torch.tensor([[2, 7, 0]]), anchor_valid=torch.tensor([[True, True, False]]),
        block_size=3, mask_token_id=99,
    )  # fmt: skip
    assert blocks.base_index.tolist() == [[2, 3, 4, 7, 8, 9, 0, 1, 2]]
    assert blocks.position_ids.tolist() == [[2, 3, 4, 0, 1, 2, 0, 1, 2]]  # continues the anchor's numbering
    assert blocks.input_ids.tolist() == [[102, 99, 99, 107, 99, 99, 100, 99, 99]]
    assert blocks.target_index.tolist() == [[1, 2, 3, 6, 7, 8, 11, 0, 1]]  # (a + k - 1) mod T
    # anchor 2: slot 2 is row 4 = doc 1 (speculators would train it); anchor 7: slot 2 is padding;
    # anchor 0 is not valid.
    assert blocks.loss_mask.tolist() == [[False, True, False, False, True, False, False, False, False]]


def test_build_blocks_past_the_row_end() -> None:
    T = 6
    blocks = build_blocks(
        input_ids=torch.arange(T).unsqueeze(0), loss_mask=torch.ones(1, T, dtype=torch.bool),
        document_ids=torch.zeros(1, T, dtype=torch.long), position_ids=torch.arange(T).unsqueeze(0),
        anchors=torch.tensor([[4]]), anchor_valid=torch.tensor([[True]]), block_size=4, mask_token_id=9,
    )  # fmt: skip
    assert blocks.base_index.tolist() == [[4, 5, 6, 7]]
    assert blocks.target_index.tolist() == [[3, 4, 5, 0]]  # wraps; the wrapped slot is masked
    assert blocks.loss_mask.tolist() == [[False, True, False, False]]
