"""Block attention masks: exact small cases by hand, and dense == flex on shapes spanning many tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from dflash_core.masks import BlockVisibility, dense_mask, flex_block_mask

#                 rows: 0  1  2  3  4  5  6  7  8   9
DOCS = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1]])
T, BS = 10, 2


def _visibility(
    anchors: list[int], valid: list[bool], *, window: int | None, causal: bool
) -> BlockVisibility:
    return BlockVisibility(
        anchors=torch.tensor([anchors]),
        anchor_valid=torch.tensor([valid]),
        document_ids=DOCS,
        block_size=BS,
        window=window,
        causal=causal,
    )


def _visible(mask: torch.Tensor, q: int) -> tuple[list[int], list[int]]:
    """(visible context rows, visible block slots) of query q."""
    row = mask[0, q]
    return row[:T].nonzero().flatten().tolist(), row[T:].nonzero().flatten().tolist()


def test_context_is_same_document_strictly_before_the_anchor() -> None:
    mask = dense_mask(_visibility([3, 6, 8], [True, True, True], window=None, causal=False))
    assert mask.shape == (1, 6, T + 6)
    assert _visible(mask, 0) == ([0, 1, 2], [0, 1])  # anchor 3: rows 0..2, not the anchor row itself
    assert _visible(mask, 1) == ([0, 1, 2], [0, 1])  # bidirectional: slot 1 sees slot 0 and itself
    assert _visible(mask, 2) == ([], [2, 3])  # anchor 6 = first row of doc 1: no context at all
    assert _visible(mask, 4) == ([6, 7], [4, 5])  # anchor 8: doc 1 rows only, never doc 0's


def test_causal_in_block() -> None:
    mask = dense_mask(_visibility([3, 6], [True, True], window=None, causal=True))
    assert _visible(mask, 0) == ([0, 1, 2], [0])
    assert _visible(mask, 1) == ([0, 1, 2], [0, 1])
    assert _visible(mask, 2) == ([], [2])
    assert _visible(mask, 3) == ([], [2, 3])


@pytest.mark.parametrize(
    ("window", "rows"), [(1, [4]), (2, [3, 4]), (4, [1, 2, 3, 4]), (5, [0, 1, 2, 3, 4]), (9, [0, 1, 2, 3, 4])]
)
def test_window_boundary(window: int, rows: list[int]) -> None:
    """A sliding layer with window w sees rows a-w .. a-1: exactly w rows (fewer at the doc start)."""
    mask = dense_mask(_visibility([5], [True], window=window, causal=True))
    assert _visible(mask, 0)[0] == rows


def test_invalid_anchor_sees_only_its_own_block() -> None:
    mask = dense_mask(_visibility([5, 0], [True, False], window=None, causal=False))
    assert _visible(mask, 2) == ([], [2, 3])
    assert _visible(mask, 3) == ([], [2, 3])


def test_padding_rows_are_never_visible() -> None:
    docs = torch.tensor([[0, 0, -1, -1, 0, 0]])  # a (malformed) row with padding inside doc 0
    vis = BlockVisibility(
        anchors=torch.tensor([[5]]), anchor_valid=torch.tensor([[True]]), document_ids=docs, block_size=2
    )
    assert dense_mask(vis)[0, 0, :6].nonzero().flatten().tolist() == [0, 1, 4]


def test_every_query_sees_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    docs = torch.cat((torch.zeros(1, 30), torch.ones(1, 20), torch.full((1, 14), -1)), dim=1).long()
    anchors = torch.randint(0, 50, (1, 12), generator=gen).sort().values
    for causal in (False, True):
        vis = BlockVisibility(
            anchors=anchors, anchor_valid=torch.ones_like(anchors, dtype=torch.bool), document_ids=docs,
            block_size=4, window=3, causal=causal,
        )  # fmt: skip
        mask = dense_mask(vis)
        q = torch.arange(vis.num_queries)
        assert mask[0, q, vis.context_len + q].all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("window", "causal"), [(None, False), (None, True), (37, True), (130, False)])
def test_flex_block_mask_matches_dense(window: int | None, causal: bool) -> None:
    """Same visibility in both forms, on shapes that cross flex's 128-wide tiles (batch 2, partial tiles)."""
    gen = torch.Generator().manual_seed(1)
    B, T_, N, bs = 2, 300, 40, 5
    docs = torch.stack(
        [
            torch.cat((torch.zeros(120), torch.ones(150), torch.full((30,), -1))),
            torch.cat((torch.zeros(200), torch.ones(100))),
        ]
    ).long()
    anchors = torch.stack([torch.randperm(270, generator=gen)[:N].sort().values for _ in range(B)])
    valid = torch.rand(B, N, generator=gen) < 0.9
    vis = BlockVisibility(
        anchors=anchors, anchor_valid=valid, document_ids=docs, block_size=bs, window=window, causal=causal
    )
    dense = dense_mask(vis)
    Q, heads, D = vis.num_queries, 2, 8
    q = torch.randn(B, heads, Q, D, generator=gen)
    k = torch.randn(B, heads, T_ + Q, D, generator=gen)
    v = torch.randn(B, heads, T_ + Q, D, generator=gen)
    out_flex = flex_attention(q, k, v, block_mask=flex_block_mask(vis))
    out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense.unsqueeze(1))
    torch.testing.assert_close(out_flex, out_sdpa, rtol=1e-5, atol=1e-5)
