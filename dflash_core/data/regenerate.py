"""Rewrite every assistant turn with the verifier's own reply (on-policy data), turn by turn.

Replies written by the dataset's author teach the drafter someone else's distribution, and
acceptance drops at serving time without any error. So turn k becomes the verifier's completion of
the chat template of messages[:k] (earlier replies already regenerated, add_generation_prompt=True).
Round r sends the r-th assistant turn of every conversation still going in one `complete` call.

Invariants: an original reply is never kept after a regenerated one (a too-long prompt ends the
conversation before that turn); conversations whose assistant turns do not follow user turns, and
pre-tokenized rows, are kept as they are. Every decision is counted in `RegenerateCounts`.
Pure logic: `complete` is any function from prompts to replies (the service's Generate client, or
a plain function in tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dflash_core.data.formats import Conversation, Message, RowError, TokenizedRow
from dflash_core.data.templates import TemplateError, control_token_ids, render, tokenize_conversations

__all__ = [
    "Complete",
    "RegenerateCounts",
    "RegenerateResult",
    "Regenerator",
    "end_of_turn_ids",
    "regenerate_conversations",
]

logger = logging.getLogger(__name__)

# Token-id prompts -> the verifier's replies (new tokens only, stop token removed), in order.
Complete = Callable[[list[list[int]]], list[list[int]]]

Record = Conversation | TokenizedRow


@dataclass
class RegenerateCounts:
    """What regeneration did to the records it saw; added up over every batch."""

    conversations: int = 0  # conversations seen (pre-tokenized rows not included)
    regenerated: int = 0  # every assistant turn rewritten
    truncated: int = 0  # cut before a turn whose prompt was too long; earlier turns rewritten
    too_long: int = 0  # left out: the first assistant turn's prompt was already too long
    kept_as_is: int = 0  # an assistant turn without a user turn right before it
    pretokenized: int = 0  # token rows: nothing to regenerate, kept
    template_errors: int = 0  # left out: the chat template rejected a prompt
    turns: int = 0  # assistant turns generated
    new_tokens: int = 0  # tokens generated over all turns
    empty_replies: int = 0  # turns the verifier ended at once
    replies_at_max_new_tokens: int = 0  # turns cut by max_new_tokens (no end of turn generated)

    def add(self, other: RegenerateCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class RegenerateResult:
    """One item per input record, in order: the rewritten conversation, the record as it was, or
    a `RowError` for a left-out conversation (kind `regenerate_too_long` or `template_error`)."""

    records: list[Record | RowError]
    counts: RegenerateCounts


@dataclass
class _Work:
    """A conversation being rewritten: its messages so far and the indices of its assistant turns."""

    conversation: Conversation
    messages: list[Message]
    turns: list[int]
    done: int = 0  # assistant turns rewritten


def regenerate_conversations(
    records: Sequence[Record],
    *,
    complete: Complete,
    tokenizer: Any,
    max_prompt_tokens: int,
    max_new_tokens: int | None = None,
) -> RegenerateResult:
    """Replace each conversation's assistant turns with `complete`'s replies (see the module docstring).

    `max_prompt_tokens`: longest prompt sent. `max_new_tokens` only serves the count of replies that
    ran into it. Raises `ValueError` if `complete` returns the wrong number of replies.
    """
    counts = RegenerateCounts()
    results: list[Record | RowError] = list(records)
    active: dict[int, _Work] = {}
    for index, record in enumerate(records):
        if isinstance(record, TokenizedRow):
            counts.pretokenized += 1
            continue
        counts.conversations += 1
        messages = record.messages
        turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
        # An assistant turn not right after a user turn (a greeting after the system prompt, two
        # replies in a row) has no prompt a chat server would ever see: kept as it is.
        if any(i == 0 or messages[i - 1].role != "user" for i in turns):
            counts.kept_as_is += 1
            continue
        active[index] = _Work(conversation=record, messages=list(messages), turns=turns)

    while active:
        owners: list[int] = []
        texts: list[str] = []
        for index, work in list(active.items()):
            if work.done == len(work.turns):
                results[index] = replace(work.conversation, messages=work.messages)
                counts.regenerated += 1
                del active[index]
                continue
            try:
                prompt_messages = work.messages[: work.turns[work.done]]
                texts.append(render(prompt_messages, tokenizer=tokenizer, add_generation_prompt=True))
            except TemplateError as exc:
                conversation = work.conversation
                results[index] = RowError(conversation.source, conversation.line, str(exc), "template_error")
                counts.template_errors += 1
                del active[index]
                continue
            owners.append(index)
        if not owners:
            break
        # Without special tokens, as `tokenize_conversations` does: the template writes BOS itself.
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        prompts: list[list[int]] = []
        sent: list[int] = []
        for index, ids in zip(owners, encoded, strict=True):
            if len(ids) <= max_prompt_tokens:
                prompts.append(list(ids))
                sent.append(index)
            else:
                work = active.pop(index)
                results[index] = _cut(work, prompt_tokens=len(ids), limit=max_prompt_tokens, counts=counts)
        if not prompts:
            continue
        replies = complete(prompts)
        if len(replies) != len(prompts):
            raise ValueError(f"complete() returned {len(replies)} replies for {len(prompts)} prompts")
        # Decoded to text and rendered again by prepare-data, as a chat server renders the history:
        # the template writes its own end of turn (`complete` returns replies without their stop
        # token, or it would appear twice), and re-tokenizing gives the tokenizer's canonical split.
        contents = tokenizer.batch_decode(replies, skip_special_tokens=True)
        for index, reply, content in zip(sent, replies, contents, strict=True):
            work = active[index]
            work.messages[work.turns[work.done]] = Message(role="assistant", content=content)
            work.done += 1
            counts.turns += 1
            counts.new_tokens += len(reply)
            counts.empty_replies += not content.strip()  # kept: the end of turn is still supervised
            counts.replies_at_max_new_tokens += max_new_tokens is not None and len(reply) >= max_new_tokens
    return RegenerateResult(records=results, counts=counts)


def _cut(work: _Work, *, prompt_tokens: int, limit: int, counts: RegenerateCounts) -> Conversation | RowError:
    """End a conversation before the turn whose prompt is too long (or leave it out if that is the first).

    Never keep an original reply after a regenerated one: that row would mix two distributions."""
    conversation = work.conversation
    if work.done == 0:
        counts.too_long += 1
        return RowError(
            conversation.source,
            conversation.line,
            f"regeneration: the prompt of the first assistant turn has {prompt_tokens} tokens, more than "
            f"the {limit} allowed (service max length minus --regenerate-max-new-tokens, and below "
            "--seq-length)",
            "regenerate_too_long",
        )
    counts.truncated += 1
    last_rewritten = work.turns[work.done - 1]
    return replace(conversation, messages=work.messages[: last_rewritten + 1])


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The control token the chat template closes an assistant turn with (`[]` if none is found).

    Sent as an extra stop id: a service stops at the model's eos ids, and a chat model's end of
    turn is not always among them (a base config's eos `<|end_of_text|>` vs Llama-3's `<|eot_id|>`);
    the reply would then run on into an invented next turn.
    """
    probe = Conversation([Message("user", "Hi"), Message("assistant", "Hello")], source="probe", line=None)
    row = tokenize_conversations([probe], tokenizer=tokenizer, seq_length=None)[0]
    if isinstance(row, RowError):
        return []
    supervised = [t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m]
    return supervised[-1:] if supervised and supervised[-1] in control_token_ids(tokenizer) else []


@dataclass
class Regenerator:
    """`regenerate_conversations` with fixed settings, as prepare-data calls it batch after batch.

    `description` (which service, verifier and sampling parameters) is written to the prepared
    data's metadata next to the counts added up over every call.
    """

    complete: Complete
    tokenizer: Any
    max_prompt_tokens: int
    max_new_tokens: int | None = None
    description: dict[str, Any] = field(default_factory=dict)
    # Conversations per call: enough for full service batches on several endpoints. A verifier
    # generating in-process on one GPU wants larger rounds (one generate batch per round).
    round_size: int = 1024
    counts: RegenerateCounts = field(default_factory=RegenerateCounts)

    def __call__(self, records: Sequence[Record]) -> list[Record | RowError]:
        result = regenerate_conversations(
            records,
            complete=self.complete,
            tokenizer=self.tokenizer,
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
        )
        self.counts.add(result.counts)
        logger.info(
            "regenerated %d conversations so far (%d turns, %d new tokens; %d truncated, %d too long)",
            self.counts.regenerated,
            self.counts.turns,
            self.counts.new_tokens,
            self.counts.truncated,
            self.counts.too_long,
        )
        return result.records

    def metadata(self) -> dict[str, Any]:
        return {
            **self.description,
            "max_prompt_tokens": self.max_prompt_tokens,
            "counts": self.counts.as_json(),
        }

    def summary(self) -> str:
        c = self.counts
        return (
            f"regenerated {c.regenerated} of {c.conversations} conversations ({c.turns} turns, "
            f"{c.new_tokens} new tokens, {c.replies_at_max_new_tokens} cut at max_new_tokens); "
            f"truncated {c.truncated}, left out {c.too_long} too long and {c.template_errors} "
            "for template errors, "
            f"kept as is {c.kept_as_is} (+{c.pretokenized} pre-tokenized)"
        )
