"""The trainer's data plan: train/val split, per-epoch shuffle, packing into rows, resumable position.

Everything here is a pure function of (seed, epoch), so resuming needs only the epoch and the
step within it: the plan is rebuilt and the finished steps are skipped. Nothing random is
consumed from global RNGs, which keeps an interrupted-then-resumed run bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dflash_core.batch import plan_rows

# Offsets that keep the split, shuffle and anchor streams independent for one seed.
_SPLIT_STREAM, _SHUFFLE_STREAM, _ANCHOR_STREAM = 1, 2, 3
_VAL_ANCHOR_EPOCH = -1


def split_indices(num_rows: int, *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split. With rows to spare, val keeps at least one row."""
    order = torch.randperm(num_rows, generator=_generator(seed, _SPLIT_STREAM)).tolist()
    num_val = round(num_rows * val_fraction)
    if val_fraction > 0 and num_val == 0 and num_rows > 1:
        num_val = 1
    return sorted(order[num_val:]), sorted(order[:num_val])


def anchor_generator(*, seed: int, epoch: int, step: int, row: int) -> torch.Generator:
    """Anchors are resampled every epoch (docs/architecture.md) but fixed for a given (epoch, step, row).

    `row` is the row's index in the global step, so the anchors do not depend on the number of
    ranks the step is split over.
    """
    return _generator(seed, _ANCHOR_STREAM, epoch, step, row)


def validation_anchor_generator(*, seed: int, batch_index: int, row: int) -> torch.Generator:
    """Validation uses the same anchors every time, so val metrics compare across epochs."""
    return _generator(seed, _ANCHOR_STREAM, _VAL_ANCHOR_EPOCH, batch_index, row)


def _generator(seed: int, *stream: int) -> torch.Generator:
    mixed = seed
    for part in stream:
        mixed = (mixed * 1_000_003 + part + 7) % (2**62)
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class EpochPlan:
    """Steps of one epoch; each step is a list of packed rows; each row a list of sample indices."""

    epoch: int
    steps: list[list[list[int]]]

    def __len__(self) -> int:
        return len(self.steps)


def plan_epoch(
    indices: Sequence[int],
    lengths: Sequence[int],
    *,
    epoch: int,
    seed: int,
    total_seq_len: int,
    batch_size: int,
    shuffle: bool = True,
) -> EpochPlan:
    """Shuffle `indices` for this epoch, pack them into rows of `total_seq_len`, group rows into steps.

    `lengths[i]` is the token count of sample `indices[i]`.
    """
    order = list(range(len(indices)))
    if shuffle:
        order = torch.randperm(len(indices), generator=_generator(seed, _SHUFFLE_STREAM, epoch)).tolist()
    rows = plan_rows([lengths[i] for i in order], total_seq_len)
    packed = [[indices[order[j]] for j in row] for row in rows]
    steps = [packed[i : i + batch_size] for i in range(0, len(packed), batch_size)]
    return EpochPlan(epoch=epoch, steps=steps)
