"""TokenRows slices prepared rows out of the Arrow columns: the same tensors `datasets` formatting gives."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from services.trainer.batches import TokenRows


def _dataset(rows: int = 300, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    ids = [[rng.randrange(50_000) for _ in range(rng.randint(1, 90))] for _ in range(rows)]
    masks = [[int(rng.random() < 0.6) for _ in row] for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks})


def _views() -> dict[str, datasets.Dataset]:
    base = _dataset()
    return {
        "one chunk": base,
        "several chunks": datasets.concatenate_datasets(
            [base.select(range(100)), base.select(range(100, 300))]
        ),
        "shuffled view": base.shuffle(seed=3),
        "boolean mask column": base.cast_column("loss_mask", datasets.Sequence(datasets.Value("bool"))),
    }


@pytest.mark.parametrize("view", list(_views()))
def test_rows_equal_what_datasets_formatting_gives(view):
    dataset = _views()[view]
    rows = TokenRows(dataset, max_length=64)
    reference = dataset.with_format("torch", columns=["input_ids", "loss_mask"])
    assert rows.lengths == [min(len(ids), 64) for ids in dataset["input_ids"]]
    for index in range(len(dataset)):
        ids, mask = rows.get(index)
        expected = reference[index]
        assert ids.dtype == torch.long and mask.dtype == torch.bool
        assert torch.equal(ids, expected["input_ids"][:64].long())
        assert torch.equal(mask, expected["loss_mask"][:64].bool())


def test_rows_are_writable_copies_and_bad_indices_are_refused():
    rows = TokenRows(_dataset(rows=5), max_length=64)
    ids, _ = rows.get(0)
    ids[0] = -1  # a view of the Arrow buffer would be read-only (or would corrupt the table)
    assert rows.get(0)[0][0] != -1
    for index in (-1, 5):
        with pytest.raises(IndexError, match="out of range: the dataset has 5 rows"):
            rows.get(index)
