"""Evaluation prompts as token ids: each one ends where the verifier's first reply would start.

Sources (`dflash eval --prompts`):

- `chitchat`: the conversations shipped in `chitchat_dataset`; the first user turn, rendered with
  the verifier's chat template and its generation prompt.
- a `dflash prepare-data` folder: each row's tokens up to its first supervised (assistant) token,
  so the prompt is exactly what the trainer saw before the reply, assistant header included.
- a `.json` / `.jsonl` file of chats (`messages` / `conversations`), `{"prompt": "text"}` rows
  (one user turn) or pre-tokenized rows (`input_ids` + `loss_mask`, cut like a prepared row). A
  chat that ends with a user turn is a multi-turn prompt: all of it, and the reply to its last
  turn is decoded. Any other chat gives the turns before its first assistant turn (a training
  row's first reply). Chats need an assistant turn somewhere, as `parse_row` asks.

Rows that yield no prompt (no user turn before the reply, nothing before the first supervised
token, a malformed row) are skipped and counted; a source without one usable prompt is an error.
Prompts are taken in file order, so `--num-prompts N` always evaluates the same N.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dflash_core.data.formats import (
    CHITCHAT,
    Conversation,
    DataError,
    Message,
    RowError,
    TokenizedRow,
    parse_row,
    read_chitchat,
)
from dflash_core.data.templates import TemplateError, render

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPrompt:
    token_ids: list[int]
    source: str  # "file:line" or "chitchat:7": where the prompt came from


def load_prompts(source: str, *, tokenizer: Any, limit: int) -> list[EvalPrompt]:
    """Up to `limit` prompts from `source` (see the module docstring). Raises DataError."""
    prompts: list[EvalPrompt] = []
    skipped: list[str] = []
    for item in _records(source):
        if isinstance(item, RowError):
            skipped.append(str(item))
            continue
        record, where = item
        ids = _prompt_ids(record, tokenizer=tokenizer)
        if isinstance(ids, str):
            skipped.append(f"{where}: {ids}")
            continue
        prompts.append(EvalPrompt(token_ids=ids, source=where))
        if len(prompts) >= limit:
            break
    if skipped:
        logger.info("%d rows of %s gave no prompt; first: %s", len(skipped), source, "; ".join(skipped[:3]))
    if not prompts:
        raise DataError(
            f"--prompts {source}: no usable prompt ({len(skipped)} rows skipped"
            + (f"; first: {skipped[0]}" if skipped else "")
            + ")"
        )
    if len(prompts) < limit:
        logger.info(
            "--prompts %s holds %d prompts (fewer than --num-prompts %d)", source, len(prompts), limit
        )
    return prompts


def prepared_row_prompt(
    input_ids: list[int], loss_mask: list[int] | list[bool], *, where: str
) -> EvalPrompt | None:
    """The prompt of one prepared row (its tokens before the first supervised one), or None if it has none."""
    ids = _prompt_ids(TokenizedRow(list(input_ids), list(loss_mask), source=where, line=0), tokenizer=None)
    return None if isinstance(ids, str) else EvalPrompt(token_ids=ids, source=where)


def _records(source: str) -> Iterator[tuple[Conversation | TokenizedRow, str] | RowError]:
    if source == CHITCHAT:
        for row in read_chitchat():
            yield row if isinstance(row, RowError) else (row, f"{CHITCHAT}:{row.line}")
        return
    path = Path(source)
    if path.is_dir():
        yield from _prepared_rows(path)
        return
    if not path.is_file():
        raise DataError(f"--prompts {source!r}: not `{CHITCHAT}`, not a prepare-data folder and no such file")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"--prompts {source!r}: expected a .json or .jsonl file")
    for line, row in _json_rows(path):
        if isinstance(row, json.JSONDecodeError):
            yield RowError(source, line, f"invalid JSON: {row.msg} (column {row.colno})", "bad_json")
            continue
        where = f"{source}:{line}"
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            text = row["prompt"]
            if not text.strip():
                yield RowError(source, line, "empty prompt", "empty_content")
                continue
            yield Conversation([Message("user", text)], source=source, line=line), where
            continue
        parsed = parse_row(row, source=source, line=line)
        yield parsed if isinstance(parsed, RowError) else (parsed, where)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON array ({exc})") from exc
        yield from enumerate(rows, start=1)
        return
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as exc:
                yield line, exc


def _prepared_rows(folder: Path) -> Iterator[tuple[TokenizedRow, str]]:
    from dflash_core.data.prepare import load_prepared

    dataset, _ = load_prepared(folder)
    for index in range(len(dataset)):
        row = dataset[index]
        yield (
            TokenizedRow(list(row["input_ids"]), list(row["loss_mask"]), source=str(folder), line=index + 1),
            f"{folder}:{index + 1}",
        )


def _prompt_ids(record: Conversation | TokenizedRow, *, tokenizer: Any) -> list[int] | str:
    """Token ids of the prompt, or the reason there is none."""
    if isinstance(record, TokenizedRow):
        first = next((i for i, m in enumerate(record.loss_mask) if m), None)
        if first is None:
            return "no supervised token (nothing marks where a reply starts)"
        if first == 0:
            return "the first token is already supervised (no prompt before it)"
        return list(record.input_ids[:first])
    before = _prompt_turns(record.messages)
    if not any(m.role == "user" for m in before):
        return "no user turn before the first assistant turn"
    try:
        text = render(before, tokenizer=tokenizer, add_generation_prompt=True)
    except TemplateError as exc:
        return str(exc)
    # No added special tokens: the template writes BOS itself (as prepare-data tokenizes).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_turns(messages: list[Message]) -> list[Message]:
    """The turns a chat's prompt renders: all of them when the last is a user turn, else those before
    the first assistant turn."""
    if messages and messages[-1].role == "user":
        return list(messages)
    before: list[Message] = []
    for message in messages:
        if message.role == "assistant":
            break
        before.append(message)
    return before
