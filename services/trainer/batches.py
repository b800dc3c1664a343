"""Turns a step of the data plan (rows of sample indices) into a `PackedBatch` on the device.

This is the trainer's "fetch" phase: read token rows, ask the hidden-state source for their
hidden states (one call per step, so a remote source can batch them), pack them into rows.
Samples the source drops (no cached hidden states under `--on-missing skip|warn`) are left out.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dflash_core.batch import PackedBatch, SamplePiece, collate
from services.trainer.sources import HiddenStateSource, SampleRequest


class TokenRows:
    """Random access to prepared rows: `input_ids` and `loss_mask`, truncated to the row length.

    Rows are sliced straight out of the dataset's Arrow columns (offsets + values, zero-copy for
    the token ids of a memory-mapped dataset) instead of going through `datasets`' per-row
    formatting. Why: the trainer asks for every sample several times (each step announces the next
    steps' samples to the hidden-state source, then builds its own), and `Dataset.__getitem__` with
    torch formatting costs ~0.8 ms a row: 0.33 s of a 0.5 s step at SmolLM2 scale on an H200
    (cProfile, bench/quality/profile_parts.py), several times the drafter's forward and backward.
    """

    def __init__(self, dataset, *, max_length: int) -> None:  # dataset: datasets.Dataset
        if getattr(dataset, "_indices", None) is not None:  # a select/shuffle view: materialise it
            dataset = dataset.flatten_indices()
        self.max_length = max_length
        self._ids = _ArrowLists(dataset.data.column("input_ids"))
        self._mask = _ArrowLists(dataset.data.column("loss_mask"))
        self.lengths = [min(n, max_length) for n in self._ids.lengths()]

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self.lengths):
            raise IndexError(f"row {index} is out of range: the dataset has {len(self.lengths)} rows")
        # astype copies: the tensors own writable memory, never a view of the (read-only) table.
        ids = torch.from_numpy(self._ids.row(index)[: self.max_length].astype(np.int64))
        return ids, torch.from_numpy(self._mask.row(index)[: self.max_length].astype(np.bool_))


class _ArrowLists:
    """Row i of an Arrow list column as a numpy view: values[offsets[i] : offsets[i + 1]] of its chunk."""

    def __init__(self, column) -> None:  # pyarrow.ChunkedArray of list<...>
        self._offsets, self._values, starts = [], [], [0]
        for chunk in column.chunks:
            self._offsets.append(chunk.offsets.to_numpy())
            # Booleans are bit-packed in Arrow: those are copied (as uint8), integers are not.
            self._values.append(chunk.values.to_numpy(zero_copy_only=False))
            starts.append(starts[-1] + len(chunk))
        self._starts = np.asarray(starts)

    def lengths(self) -> list[int]:
        return [int(n) for offsets in self._offsets for n in np.diff(offsets)]

    def row(self, index: int) -> np.ndarray:
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        offsets, local = self._offsets[chunk], index - int(self._starts[chunk])
        return self._values[chunk][offsets[local] : offsets[local + 1]]


class BatchBuilder:
    def __init__(
        self,
        *,
        rows: TokenRows,
        source: HiddenStateSource,
        total_seq_len: int,
        device,
        hidden_dtype: torch.dtype | None = None,
    ) -> None:
        """`hidden_dtype`: what the drafter reads hidden states in. The service sends bf16 by default;
        a float32 run (CPU, no autocast) would otherwise feed bf16 into float32 weights."""
        self.rows = rows
        self.source = source
        self.total_seq_len = total_seq_len
        self.device = device
        self.hidden_dtype = hidden_dtype

    def prefetch(self, upcoming_steps: list[list[list[int]]]) -> None:
        """Tell the source which samples the next steps need, so a remote one can fetch ahead."""
        indices = [i for step_rows in upcoming_steps for row in step_rows for i in row]
        if indices:
            self.source.prefetch([SampleRequest(sample_id=i, input_ids=self.rows.get(i)[0]) for i in indices])

    def build(self, step_rows: list[list[int]]) -> PackedBatch | None:
        """The step's rows packed on the device; None when the source dropped every sample.

        A source may drop samples (`--on-missing skip|warn`): rows keep the samples that came
        back and rows left empty are removed.
        """
        indices = [i for row in step_rows for i in row]
        tokens = {i: self.rows.get(i) for i in indices}
        states = self.source.extract([SampleRequest(sample_id=i, input_ids=tokens[i][0]) for i in indices])
        by_id = {s.sample_id: s for s in states}
        packed_rows = [
            [
                SamplePiece(
                    input_ids=tokens[i][0],
                    loss_mask=tokens[i][1],
                    aux_hidden_states=by_id[i].aux,
                    last_hidden_states=by_id[i].last,
                )
                for i in row
                if i in by_id
            ]
            for row in step_rows
        ]
        packed_rows = [row for row in packed_rows if row]
        if not packed_rows:
            return None
        batch = collate(packed_rows, total_seq_len=self.total_seq_len).to(self.device)
        if self.hidden_dtype is not None and batch.aux_hidden_states.dtype != self.hidden_dtype:
            batch = dataclasses.replace(
                batch,
                aux_hidden_states=batch.aux_hidden_states.to(self.hidden_dtype),
                last_hidden_states=batch.last_hidden_states.to(self.hidden_dtype),
            )
        return batch
