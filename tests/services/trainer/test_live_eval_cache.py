"""A resumed run reads its live-acceptance sequences from its save path (live_eval_cache)."""

from __future__ import annotations

import logging

import torch

from dflash_core.live_acceptance import EvalSequence
from services.trainer.live_eval_cache import cache_file, cached_sequences

KEY = {"verifier": {"name_or_path": "v"}, "block_size": 4, "max_new_tokens": 8, "prompts": [[1, 2, 3]]}


class Fetch:
    """What `live_eval.fetch_sequences` returns, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> list[EvalSequence]:
        self.calls += 1
        aux = torch.arange(60, dtype=torch.bfloat16).reshape(10, 6) + self.calls
        return [EvalSequence(prompt_ids=[1, 2, 3], continuation=[4] * 11, max_new_tokens=8, aux=aux)]


def _same(a: list[EvalSequence], b: list[EvalSequence]) -> bool:
    return all(
        (x.prompt_ids, x.continuation, x.max_new_tokens) == (y.prompt_ids, y.continuation, y.max_new_tokens)
        and x.aux.dtype == y.aux.dtype
        and torch.equal(x.aux, y.aux)
        for x, y in zip(a, b, strict=True)
    )


def test_a_second_run_reads_what_the_first_fetched(tmp_path):
    path, fetch = cache_file(tmp_path, rank=0, world_size=1), Fetch()
    first = cached_sequences(path, key=KEY, fetch=fetch)
    second = cached_sequences(path, key=KEY, fetch=fetch)
    assert fetch.calls == 1 and path.is_file() and _same(first, second)


def test_another_key_or_a_damaged_file_fetches_again(tmp_path):
    path, fetch = cache_file(tmp_path, rank=0, world_size=1), Fetch()
    cached_sequences(path, key=KEY, fetch=fetch)
    longer = cached_sequences(path, key={**KEY, "max_new_tokens": 16}, fetch=fetch)
    assert fetch.calls == 2 and float(longer[0].aux[0, 0]) == 2.0  # the new fetch, not the stored one
    path.write_bytes(path.read_bytes()[:40])  # a truncated file
    cached_sequences(path, key={**KEY, "max_new_tokens": 16}, fetch=fetch)
    assert fetch.calls == 3


def test_an_unwritable_save_path_is_a_warning_not_a_failure(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fetch = Fetch()
    with caplog.at_level(logging.WARNING, logger="services.trainer.live_eval_cache"):
        sequences = cached_sequences(cache_file(blocker, rank=0, world_size=1), key=KEY, fetch=fetch)
    assert fetch.calls == 1 and len(sequences) == 1
    assert "could not keep the sequences" in caplog.text
