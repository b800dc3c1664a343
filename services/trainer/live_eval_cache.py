"""The live-acceptance sequences of a run, kept in its save path so a resumed run does not fetch them again.

Live tau needs each held-out prompt's greedy continuation and the aux hidden states of its row,
fetched once per trainer process (`live_eval.fetch_sequences`). Why keep them: fetching them
decodes every prompt one token at a time; with the verifier in-process on an H200 that was 38 s
per trainer start for 8 prompts of 96 tokens, paid again by every resume (the quality benchmark
resumes each drafter in every 10-minute command). A resumed run with the same prompts, verifier,
layer ids and lengths reads `<save_path>/live_eval/rank{r}-of{n}.safetensors` instead.

The file holds the aux tensors and, as metadata, the key and every sequence's token ids; it is
read only when the key matches exactly, and written atomically. Any `OSError` writing it is a
warning: the cache can only save time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dflash_core.atomic_files import atomic_file
from dflash_core.live_acceptance import EvalSequence

logger = logging.getLogger(__name__)

FORMAT = 1


def cache_file(save_path: Path, *, rank: int, world_size: int) -> Path:
    return Path(save_path) / "live_eval" / f"rank{rank}-of{world_size}.safetensors"


def cached_sequences(
    path: Path, *, key: dict[str, Any], fetch: Callable[[], list[EvalSequence]]
) -> list[EvalSequence]:
    """The sequences stored at `path` under `key`, else `fetch()`'s, stored there for the next run."""
    wanted = json.dumps({"format": FORMAT, **key}, sort_keys=True)
    stored = _read(path, wanted)
    if stored is not None:
        logger.info(
            "live acceptance: %d sequences read from %s (fetched by an earlier run)", len(stored), path
        )
        return stored
    sequences = fetch()
    try:
        _write(path, wanted, sequences)
    except OSError as exc:
        logger.warning(
            "live acceptance: could not keep the sequences at %s (%s); a resume fetches them again", path, exc
        )
    return sequences


def _read(path: Path, wanted: str) -> list[EvalSequence] | None:
    """The stored sequences when the file exists, is whole and was written under `wanted`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != wanted:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError):
        return None
    return _sequences(metadata, tensors)


def _sequences(metadata: dict[str, str], tensors: dict) -> list[EvalSequence]:
    rows = json.loads(metadata["sequences"])
    return [
        EvalSequence(
            prompt_ids=row["prompt_ids"],
            continuation=row["continuation"],
            max_new_tokens=row["max_new_tokens"],
            aux=tensors.get(f"aux_{i}"),
        )
        for i, row in enumerate(rows)
    ]


def _write(path: Path, key: str, sequences: list[EvalSequence]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt_ids": s.prompt_ids, "continuation": s.continuation, "max_new_tokens": s.max_new_tokens}
        for s in sequences
    ]
    tensors = {f"aux_{i}": s.aux.contiguous() for i, s in enumerate(sequences) if s.aux is not None}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "sequences": json.dumps(rows)})
