"""Turns a step of the data plan (rows of sample indices) into a `PackedBatch` on the device.

This is the trainer's "fetch" phase: read token rows, ask the hidden-state source for their
hidden states (one call per step, so a remote source can batch them), pack them into rows.
Samples the source drops (no cached hidden states under `--on-missing skip|warn`) are left out.
"""

from __future__ import annotations

import dataclasses

import torch

from dflash_core.batch import PackedBatch, SamplePiece, collate
from services.trainer.sources import HiddenStateSource, SampleRequest


class TokenRows:
    """Random access to prepared rows: `input_ids` and `loss_mask`, truncated to the row length."""

    def __init__(self, dataset, *, max_length: int) -> None:  # dataset: datasets.Dataset
        self.dataset = dataset.with_format("torch", columns=["input_ids", "loss_mask"])
        self.max_length = max_length
        self.lengths = [min(len(ids), max_length) for ids in dataset["input_ids"]]

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.dataset[index]
        ids = row["input_ids"][: self.max_length].long()
        return ids, row["loss_mask"][: self.max_length].bool()


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
