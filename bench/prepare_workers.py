"""prepare-data's tokenizer workers against `datasets.map(num_proc=...)`, on CPU.

    python -m bench.prepare_workers --rows 4000 --num-proc 2

Both tokenize the same chitchat conversations with the same function (`tokenize_conversations`,
chunks of prepare.CHUNK) and the tiny test tokenizer; each figure is the best of `--repeats`, pool
or map start-up included, since prepare-data pays it once per run. `prepare_data` asks for rows a
batch at a time (it stops at `max_samples`, and regenerates in rounds), so `map` would be called
once per batch there; the `map per batch` line shows that cost.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import Any

from dflash_core.config import PrepareDataConfig
from dflash_core.data.formats import Conversation, Message, read_chitchat
from dflash_core.data.prepare import CHUNK, _tokenizer_pool
from dflash_core.data.templates import tokenize_conversations
from tests.factories.tokenizers import make_chat_tokenizer


def conversations(rows: int) -> list[Conversation]:
    usable = (c for c in read_chitchat() if isinstance(c, Conversation))
    return list(itertools.islice(usable, rows))


def pool(tokenizer: Any, records: list[Conversation], num_proc: int) -> int:
    config = PrepareDataConfig(model="tiny", data=["chitchat"], output="unused", num_proc=num_proc)
    with _tokenizer_pool(tokenizer=tokenizer, config=config, vocab_size=len(tokenizer)) as tokenize:
        step = CHUNK * num_proc  # what prepare_data hands it at a time
        return sum(len(list(tokenize(records[i : i + step]))) for i in range(0, len(records), step))


def _as_dicts(records: list[Conversation]) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": m.role, "content": m.content} for m in r.messages], "source": r.source}
        for r in records
    ]


def _map(tokenizer: Any, rows: list[dict[str, Any]], num_proc: int) -> int:
    from datasets import Dataset

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        convs = [
            Conversation([Message(m["role"], m["content"]) for m in messages], source, None)
            for messages, source in zip(batch["messages"], batch["source"], strict=True)
        ]
        out = tokenize_conversations(convs, tokenizer=tokenizer, seq_length=None)
        return {"input_ids": [getattr(r, "input_ids", []) for r in out]}

    dataset = Dataset.from_list(rows)
    mapped = dataset.map(
        tokenize,
        batched=True,
        batch_size=CHUNK,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
    )
    return len(mapped)


def datasets_map(tokenizer: Any, records: list[Conversation], num_proc: int) -> int:
    return _map(tokenizer, _as_dicts(records), num_proc)


def datasets_map_per_batch(tokenizer: Any, records: list[Conversation], num_proc: int) -> int:
    rows = _as_dicts(records)
    step = CHUNK * num_proc
    return sum(_map(tokenizer, rows[i : i + step], num_proc) for i in range(0, len(rows), step))


def best_of(repeats: int, run: Callable[[], int], expected: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert run() == expected
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    tokenizer = make_chat_tokenizer()
    records = conversations(args.rows)
    n = len(records)
    print(f"{n} chitchat conversations, num_proc={args.num_proc}, best of {args.repeats}")
    for name, run in (
        ("in-process (num_proc=1)", lambda: pool(tokenizer, records, 1)),
        ("ProcessPoolExecutor", lambda: pool(tokenizer, records, args.num_proc)),
        ("datasets.map, all rows", lambda: datasets_map(tokenizer, records, args.num_proc)),
        ("datasets.map per batch", lambda: datasets_map_per_batch(tokenizer, records, args.num_proc)),
    ):
        seconds = best_of(args.repeats, run, n)
        print(f"  {name:26s} {seconds:6.2f} s  ({n / seconds:,.0f} rows/s)", flush=True)


if __name__ == "__main__":
    main()
