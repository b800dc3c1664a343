"""Packing samples into rows: the first-fit plan and the packed tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dflash_core.batch import SamplePiece, collate, placeholder_batch, plan_rows
from dflash_core.model.config import DrafterConfig


def test_plan_rows_first_fit_by_hand() -> None:
    # row 0: 5+3 (full); 4 opens row 1; 2 joins it; 9 > 8 gets its own row; 1 fits row 1 (the first with room)
    assert plan_rows([5, 3, 4, 2, 9, 1], 8) == [[0, 1], [2, 3, 5], [4]]
    assert plan_rows([8, 8, 0, 7, 1], 8) == [[0], [1], [3, 4]]  # zero-length samples are dropped
    assert plan_rows([], 8) == []


def test_plan_rows_matches_a_naive_first_fit() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 120, (500,), generator=gen).tolist()
    rows: list[list[int]] = []
    free: list[int] = []
    for i, length in enumerate(lengths):
        need = min(length, 100)
        for r, space in enumerate(free):
            if space >= need:
                rows[r].append(i)
                free[r] -= need
                break
        else:
            rows.append([i])
            free.append(100 - need)
    assert plan_rows(lengths, 100) == rows


def _piece(t: int, start: int) -> SamplePiece:
    return SamplePiece(
        input_ids=torch.arange(start, start + t),
        loss_mask=torch.arange(t) % 2 == 1,
        aux_hidden_states=torch.full((t, 6), float(start)),
        last_hidden_states=torch.full((t, 3), float(-start)),
    )


def test_collate_packs_pads_and_truncates() -> None:
    batch = collate([[_piece(3, 10), _piece(2, 20)], [_piece(9, 30)]], total_seq_len=7)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 0, 0], [30, 31, 32, 33, 34, 35, 36]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, -1, -1], [0] * 7]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0], list(range(7))]
    assert batch.loss_mask.tolist() == [
        [False, True, False, False, True, False, False],
        [False, True] * 3 + [False],
    ]
    assert batch.aux_hidden_states.shape == (2, 7, 6) and batch.last_hidden_states.shape == (2, 7, 3)
    assert batch.aux_hidden_states[0, :, 0].tolist() == [10, 10, 10, 20, 20, 0, 0]
    assert batch.last_hidden_states[1, 6, 0].item() == -30
    assert (batch.num_tokens, batch.num_documents) == (12, 3)
    moved = batch.to("cpu")
    assert (moved.num_tokens, moved.num_documents) == (12, 3)


def test_collate_pad_to_longest_and_counts_from_tensors() -> None:
    batch = collate([[_piece(3, 10)], [_piece(2, 20), _piece(2, 40)]], total_seq_len=16, pad_to_longest=True)
    assert batch.shape == (2, 4)
    assert batch.document_ids.tolist() == [[0, 0, 0, -1], [0, 0, 1, 1]]
    rebuilt = type(batch)(
        input_ids=batch.input_ids, loss_mask=batch.loss_mask, document_ids=batch.document_ids,
        position_ids=batch.position_ids, aux_hidden_states=batch.aux_hidden_states,
        last_hidden_states=batch.last_hidden_states,
    )  # fmt: skip
    assert (rebuilt.num_tokens, rebuilt.num_documents) == (7, 3)


def test_placeholder_batch_is_one_padding_row_with_nothing_to_learn() -> None:
    config = DrafterConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, block_size=4, aux_hidden_state_layer_ids=[1, 2, 3],
        mask_token_id=7, vocab_size=40, draft_vocab_size=40, target_hidden_size=6,
    )  # fmt: skip
    batch = placeholder_batch(config, total_seq_len=5, dtype=torch.bfloat16)
    assert batch.shape == (1, 5) and (batch.num_tokens, batch.num_documents) == (0, 0)
    assert batch.document_ids.tolist() == [[-1] * 5] and not batch.loss_mask.any()
    assert batch.aux_hidden_states.shape == (1, 5, 18) and batch.last_hidden_states.shape == (1, 5, 6)
    assert batch.aux_hidden_states.dtype == torch.bfloat16 and not batch.aux_hidden_states.any()
    drafting = placeholder_batch(config, total_seq_len=5, dtype=torch.float32, with_targets=False)
    assert drafting.last_hidden_states.shape == (1, 5, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_collate_packs_on_the_device_of_the_hidden_states() -> None:
    """Token ids on the host, hidden states on the GPU (the in-process verifier's case): the batch
    is built on the GPU, equal to the CPU one, and moving it there again copies nothing."""
    rows = [[_piece(3, 10), _piece(2, 20)], [_piece(9, 30)]]
    on_gpu = [
        [
            dataclasses.replace(
                p,
                aux_hidden_states=p.aux_hidden_states.cuda(),
                last_hidden_states=p.last_hidden_states.cuda(),
            )
            for p in row
        ]
        for row in rows
    ]
    batch = collate(on_gpu, total_seq_len=7)
    reference = collate(rows, total_seq_len=7)
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            assert value.is_cuda, f.name
            assert torch.equal(value.cpu(), getattr(reference, f.name)), f.name
    assert (batch.num_tokens, batch.num_documents) == (reference.num_tokens, reference.num_documents)
    moved = batch.to("cuda")
    assert moved.aux_hidden_states.data_ptr() == batch.aux_hidden_states.data_ptr()
