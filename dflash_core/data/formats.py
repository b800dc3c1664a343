"""Readers that turn every supported data source into one record type.

Sources (`PrepareDataConfig.data` entries):

- `sharegpt`: ShareGPT (Vicuna, unfiltered) from the Hugging Face hub, as speculators uses it.
- `ultrachat`: UltraChat 200k, split `train_sft`, from the Hugging Face hub.
- `chitchat`: the conversations shipped in the `chitchat_dataset` PyPI package (works offline).
- a path to a `.json` (array of rows, or JSON lines) or `.jsonl` file whose rows are ShareGPT
  (`conversations: [{from, value}]`), OpenAI/UltraChat (`messages: [{role, content}]`) or
  pre-tokenized (`input_ids` + `loss_mask`, equal lengths).

Every row becomes a `Conversation`, a `TokenizedRow`, or a `RowError` that says where the row is and
why it was skipped: one malformed row never stops a run. `line` is 1-based everywhere: the line of a
`.jsonl` file, the element of a `.json` array, the row of a hub split, the conversation of chitchat.
Problems with a whole source (unknown name, missing file) raise `DataError`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]

# Role spellings seen in the wild. ShareGPT dumps label replies by the model that wrote them
# (`gpt`, `chatgpt`, `bing`, `bard`); anything else (`tool`, `function`, typos) skips the row,
# because guessing a role would put the loss on the wrong side of the conversation.
ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


class DataError(Exception):
    """A whole source or output is unusable; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation to be rendered with the verifier's chat template."""

    messages: list[Message]
    source: str
    line: int | None


@dataclass(frozen=True, slots=True)
class TokenizedRow:
    """Token ids with their loss mask (1 = the drafter is trained to predict this token)."""

    input_ids: list[int]
    loss_mask: list[int]
    source: str
    line: int | None


@dataclass(frozen=True, slots=True)
class RowError:
    """A skipped row: where it is (`source`, 1-based `line`), why, and a short `kind` for counting."""

    source: str
    line: int | None
    reason: str
    kind: str = field(default="invalid_row")

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.reason}"


Record = Conversation | TokenizedRow
ReadResult = Conversation | TokenizedRow | RowError


@dataclass(frozen=True, slots=True)
class HubSource:
    """A public Hugging Face dataset known by a short name."""

    repo: str
    split: str


# The same public datasets speculators' prepare_data uses for these names (ultrachat_200k has no
# `train` split; `train_sft` is its supervised-finetuning split).
HUB_SOURCES: dict[str, HubSource] = {
    "sharegpt": HubSource(repo="Aeala/ShareGPT_Vicuna_unfiltered", split="train"),
    "ultrachat": HubSource(repo="HuggingFaceH4/ultrachat_200k", split="train_sft"),
}
CHITCHAT = "chitchat"
BUILTIN_SOURCES = (*HUB_SOURCES, CHITCHAT)


# ---------------------------------------------------------------------------------------------
# One row (a parsed JSON object) to a record
# ---------------------------------------------------------------------------------------------


def parse_row(row: Any, *, source: str, line: int | None) -> ReadResult:
    """Turn one JSON object into a `Conversation`, a `TokenizedRow`, or a `RowError` (never raises)."""
    if not isinstance(row, dict):
        reason = f"row is a JSON {type(row).__name__}, expected an object"
        return RowError(source, line, reason, "not_an_object")
    if "input_ids" in row or "loss_mask" in row:
        return _parse_pretokenized(row, source=source, line=line)
    for key in ("conversations", "messages"):
        if key in row:
            return _parse_turns(row[key], key=key, source=source, line=line)
    found = ", ".join(sorted(map(str, row))) or "none"
    return RowError(
        source,
        line,
        f"missing key: expected 'conversations', 'messages', or 'input_ids'+'loss_mask' (found: {found})",
        "missing_key",
    )


def _parse_turns(turns: Any, *, key: str, source: str, line: int | None) -> Conversation | RowError:
    if not isinstance(turns, list) or not turns:
        return RowError(source, line, f"'{key}' must be a non-empty list of turns", "missing_key")
    messages: list[Message] = []
    for number, turn in enumerate(turns, start=1):
        parsed = _parse_turn(turn, number=number)
        if isinstance(parsed, tuple):
            reason, kind = parsed
            return RowError(source, line, reason, kind)
        messages.append(parsed)
    if not any(m.role == "assistant" for m in messages):
        return RowError(source, line, "no assistant turn (nothing to supervise)", "no_assistant_turn")
    return Conversation(messages=messages, source=source, line=line)


def _parse_turn(turn: Any, *, number: int) -> Message | tuple[str, str]:
    """A `Message`, or `(reason, kind)` when the turn is unusable."""
    if not isinstance(turn, dict):
        return f"turn {number} is a JSON {type(turn).__name__}, expected an object", "missing_key"
    # ShareGPT spells turns {from, value}; OpenAI/UltraChat {role, content}. Accept either in
    # both containers: converted datasets mix them freely.
    role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    if role_key not in turn or content_key not in turn:
        return f"turn {number}: missing key '{role_key}' or '{content_key}'", "missing_key"
    raw_role = turn[role_key]
    role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
    if role is None:
        return f"turn {number}: unknown role {raw_role!r} (known: {', '.join(ROLE_ALIASES)})", "unknown_role"
    content = _text_of(turn[content_key])
    if content is None:
        return f"turn {number}: content must be a string or a list of text parts", "bad_content"
    if not content.strip():
        return f"turn {number}: empty content", "empty_content"
    return Message(role=role, content=content)


def _text_of(content: Any) -> str | None:
    """Plain text of a message: a string, or OpenAI-style `[{type: text, text}]` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _parse_pretokenized(row: dict, *, source: str, line: int | None) -> TokenizedRow | RowError:
    ids, mask = row.get("input_ids"), row.get("loss_mask")
    if ids is None or mask is None:
        missing = "loss_mask" if mask is None else "input_ids"
        return RowError(source, line, f"pre-tokenized row without '{missing}'", "missing_key")
    if not isinstance(ids, list) or not isinstance(mask, list) or not ids:
        return RowError(source, line, "'input_ids' and 'loss_mask' must be non-empty lists", "bad_token_ids")
    # bool is an int subclass in Python; a `true` among token ids is a broken export, not id 1.
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        return RowError(source, line, "'input_ids' must hold non-negative integers", "bad_token_ids")
    if not all(m in (0, 1) for m in mask):
        return RowError(source, line, "'loss_mask' must hold only 0/1 (or true/false)", "bad_loss_mask")
    if len(ids) != len(mask):
        # A skewed mask would shift every label by the difference and still train "fine".
        return RowError(
            source, line, f"length mismatch: {len(ids)} input_ids vs {len(mask)} loss_mask", "length_mismatch"
        )
    return TokenizedRow(input_ids=list(ids), loss_mask=[int(m) for m in mask], source=source, line=line)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def read_source(spec: str) -> Iterator[ReadResult]:
    """Yield every row of one source (a built-in name or a file path) as a record or a `RowError`.

    Raises `DataError` when the source itself is unusable (unknown name, missing file, wrong suffix).
    """
    if spec in HUB_SOURCES:
        return read_hub(spec, HUB_SOURCES[spec])
    if spec == CHITCHAT:
        return read_chitchat()
    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"unknown data source {spec!r}: not a built-in ({', '.join(BUILTIN_SOURCES)}) and no such file"
        )
    if path.is_dir() or path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"data source {spec!r}: expected a .json or .jsonl file")
    return read_json_file(path, source=spec)


def read_json_file(path: Path, *, source: str) -> Iterator[ReadResult]:
    """Rows of a `.jsonl` file, or of a `.json` file holding an array (or, misnamed, JSON lines)."""
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith("["):
        yield from _read_json_array(path, source=source)
    else:
        yield from _read_json_lines(path, source=source)


def _read_json_lines(path: Path, *, source: str) -> Iterator[ReadResult]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield RowError(source, number, f"invalid JSON: {exc.msg} (column {exc.colno})", "bad_json")
                continue
            yield parse_row(row, source=source, line=number)


def _read_json_array(path: Path, *, source: str) -> Iterator[ReadResult]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        # One broken array cannot be split into rows; report where it broke and stop.
        yield RowError(source, exc.lineno, f"invalid JSON array: {exc.msg} (column {exc.colno})", "bad_json")
        return
    for number, row in enumerate(rows, start=1):
        yield parse_row(row, source=source, line=number)


def _load_hub_dataset(repo: str, split: str) -> Iterable[dict]:
    # Imported here: `datasets` is heavy and only the hub sources need `load_dataset`.
    from datasets import load_dataset

    return load_dataset(repo, split=split)


# Replaceable in tests, where there is no hub.
load_hub_dataset: Callable[[str, str], Iterable[dict]] = _load_hub_dataset


def read_hub(name: str, hub: HubSource) -> Iterator[ReadResult]:
    """Rows of a public Hugging Face dataset (`sharegpt`, `ultrachat`); needs the hub or its cache."""
    try:
        rows = load_hub_dataset(hub.repo, hub.split)
    except Exception as exc:  # network, auth, missing cache: all mean the same thing to the user
        raise DataError(
            f"data source {name!r}: could not load {hub.repo} (split {hub.split}) from the Hugging Face hub: "
            f"{exc}. Without network access, download it elsewhere and pass a .json/.jsonl path instead."
        ) from exc
    for number, row in enumerate(rows, start=1):
        yield parse_row(row, source=name, line=number)


def chitchat_path() -> Path:
    """The JSON file shipped inside the `chitchat_dataset` package."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise DataError("data source 'chitchat' needs the `chitchat_dataset` package (pip install it)")
    return Path(spec.origin).parent / "dataset.json"


def read_chitchat(path: Path | None = None) -> Iterator[ReadResult]:
    """Chit-Chat conversations: two people alternate; the first is the user, the second the assistant.

    Each chitchat message is a run of short utterances by one sender; they are joined with newlines.
    Conversations with a single message have no reply and come back as `RowError`s.
    """
    data = json.loads((path or chitchat_path()).read_text(encoding="utf-8"))
    for number, conversation in enumerate(data.values(), start=1):
        yield _chitchat_conversation(conversation, line=number)


def _chitchat_conversation(conversation: Any, *, line: int) -> ReadResult:
    try:
        runs = conversation["messages"]
        first_sender = runs[0][0]["sender"]
        turns = [
            {
                "role": "user" if run[0]["sender"] == first_sender else "assistant",
                "content": "\n".join(u["text"].strip() for u in run if u["text"].strip()),
            }
            for run in runs
        ]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        return RowError(CHITCHAT, line, f"unexpected chitchat layout ({exc!r})", "missing_key")
    return _parse_turns(turns, key="messages", source=CHITCHAT, line=line)
