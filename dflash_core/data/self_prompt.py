"""Self-generated conversations: the verifier writes the user turns, then answers them (Magpie).

A chat template opened at a user turn is a prompt whose likeliest continuation is a user message:

    pre-query text = render(messages so far + [user(MARK)]) cut before MARK
    user turn      = write(pre-query) up to the template's end of turn (a stop id)
    reply          = reply(render(messages + [user turn], add_generation_prompt=True))

Every kept user turn ended with the end of turn, holds no special token (generated or spelt out)
and passes `check_prompt`; each refusal is counted by reason, and a refused later turn ends the
conversation before it. Bad settings raise `DataError` at construction, before any generation.
`write` and `reply` are `Complete` functions (the service's Generate, or the verifier in process).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dflash_core.config import SELF_DATA
from dflash_core.data.formats import Conversation, DataError, Message
from dflash_core.data.regenerate import Complete
from dflash_core.data.templates import TemplateError, check_tokenizer, control_token_ids, render

__all__ = [
    "CheckPrompt",
    "SelfPromptCounts",
    "SelfPromptSettings",
    "SelfPrompter",
    "end_of_user_turn_ids",
    "pre_query_text",
]

logger = logging.getLogger(__name__)


# (text, token ids of the text as written) -> why it is refused, or None to keep it.
CheckPrompt = Callable[[str, Sequence[int]], str | None]

# A private-use code point: never in real text, so it marks where a user's content goes.
_MARK = "\ue002"


@dataclass(frozen=True)
class SelfPromptSettings:
    """What to write; sampling lives in the `Complete` functions."""

    samples: int  # conversations wanted
    turns: int = 1  # user turns per conversation (each answered)
    max_prompt_tokens: int = 256  # longest user turn written; longer is `unfinished`
    max_context_tokens: int = 4096  # longest prompt sent for a reply (the service's limit)
    system_prompt: str | None = None  # kept in every conversation
    topics: tuple[str, ...] = ()  # steer the user turns, one topic per conversation in turn
    topic_template: str = "The user will ask you a question or give you a task about {topic}."
    # Candidates per missing conversation in a round: the filters and dedup refuse some.
    oversample: float = 1.25
    max_rounds: int = 8  # rounds before giving up on `samples` (a filter refusing nearly all)
    round_size: int = 4096  # conversations written per round at most (one big batch each)

    def __post_init__(self) -> None:
        if self.samples < 1 or self.turns < 1 or self.max_prompt_tokens < 1 or self.max_rounds < 1:
            raise ValueError("samples, turns, max_prompt_tokens and max_rounds must be at least 1")
        if self.oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")
        if self.topics and "{topic}" not in self.topic_template:
            raise ValueError("the topic template must contain '{topic}'")


@dataclass
class SelfPromptCounts:
    """What writing did: conversations started and kept, turns and tokens, refusals by reason."""

    started: int = 0
    kept: int = 0
    rounds: int = 0
    user_turns: int = 0  # user turns kept
    prompt_tokens: int = 0  # tokens of the kept user turns
    replies: int = 0
    reply_tokens: int = 0
    replies_at_max_new_tokens: int = 0
    shortened: int = 0  # kept with fewer turns than asked (a later turn was refused)
    refused: Counter[str] = field(default_factory=Counter)  # user turns refused, by reason

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "kept": self.kept,
            "rounds": self.rounds,
            "user_turns": self.user_turns,
            "prompt_tokens": self.prompt_tokens,
            "replies": self.replies,
            "reply_tokens": self.reply_tokens,
            "replies_at_max_new_tokens": self.replies_at_max_new_tokens,
            "shortened": self.shortened,
            "refused": dict(sorted(self.refused.items())),
        }


def pre_query_text(messages: Sequence[Message], *, tokenizer: Any) -> str:
    """The rendering of `messages` followed by an opened user turn: where a user's text begins.

    Raises `DataError` if the template puts no user content there (no user role) or puts it
    somewhere that depends on the content (the marker appears other than once).
    """
    before, _ = _around_user_content(messages, tokenizer=tokenizer)
    return before


def end_of_user_turn_ids(tokenizer: Any) -> list[int]:
    """The control token that closes a user turn (ChatML's `<|im_end|>`): where writing stops.

    Raises `DataError` if the template closes a user turn with no special token: the written
    turn would have no end the model can signal, and would run on into a reply.
    """
    _, after = _around_user_content([], tokenizer=tokenizer)
    controls = control_token_ids(tokenizer)
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in controls:
            return [int(token)]
    raise DataError(
        "the chat template closes a user turn without a special token; self-generated prompts "
        "need one to know where the user's text ends"
    )


def _around_user_content(messages: Sequence[Message], *, tokenizer: Any) -> tuple[str, str]:
    """The rendered text before and after the content of a user turn appended to `messages`."""
    try:
        text = render([*messages, Message("user", _MARK)], tokenizer=tokenizer)
    except TemplateError as exc:
        raise DataError(f"the chat template cannot open a user turn here: {exc}") from exc
    if text.count(_MARK) != 1:
        raise DataError(
            "the chat template does not render a user message as a turn of its own (the probe "
            f"content appears {text.count(_MARK)} times); self-generated prompts need a chat model's "
            "template with a user role"
        )
    before, after = text.split(_MARK)
    return before, after


@dataclass
class _Draft:
    """A conversation being written: its stored messages and its steering message, if any."""

    messages: list[Message]
    steer: str | None  # shown to the writer only, as (part of) the system message
    user_turns: int = 0


class SelfPrompter:
    """Writes `settings.samples` conversations with the verifier (see the module docstring)."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        write: Complete,
        reply: Complete,
        settings: SelfPromptSettings,
        check_prompt: CheckPrompt | None = None,
        description: dict[str, Any] | None = None,
    ) -> None:
        """`write` must stop at `end_of_user_turn_ids(tokenizer)` and return at most
        `settings.max_prompt_tokens` tokens (a reply of exactly that many counts as unfinished).
        Raises `DataError` for a tokenizer or template that cannot self-prompt."""
        check_tokenizer(tokenizer)
        self.tokenizer, self.write, self.reply, self.settings = tokenizer, write, reply, settings
        self.check_prompt = check_prompt
        self.description = dict(description or {})
        self.counts = SelfPromptCounts()
        self._controls = control_token_ids(tokenizer)
        self.stop_ids = end_of_user_turn_ids(tokenizer)
        # Fail now, not after the first round, on a template that refuses the asked-for roles.
        pre_query_text(_steered(self._opening(), self._steer(0)), tokenizer=tokenizer)

    # ------------------------------------------------------------------ the conversations
    def conversations(self) -> list[Conversation]:
        """Write until `samples` conversations are kept or `max_rounds` rounds are spent."""
        s = self.settings
        kept: list[Conversation] = []
        while len(kept) < s.samples and self.counts.rounds < s.max_rounds:
            missing = s.samples - len(kept)
            size = min(s.round_size, max(missing, round(missing * s.oversample)))
            drafts = [self._new_draft() for _ in range(size)]
            self.counts.rounds += 1
            for draft in self._write_round(drafts)[:missing]:
                kept.append(Conversation(draft.messages, source=SELF_DATA, line=len(kept) + 1))
            logger.info(
                "self-prompting round %d: %d of %d conversations kept (%s refused so far)",
                self.counts.rounds,
                len(kept),
                s.samples,
                dict(self.counts.refused) or "none",
            )
        self.counts.kept = len(kept)
        if len(kept) < s.samples:
            logger.warning(
                "self-prompting kept %d of %d conversations after %d rounds; refusals: %s",
                len(kept),
                s.samples,
                s.max_rounds,
                dict(self.counts.refused),
            )
        return kept

    def _new_draft(self) -> _Draft:
        self.counts.started += 1
        return _Draft(messages=self._opening(), steer=self._steer(self.counts.started - 1))

    def _opening(self) -> list[Message]:
        system = self.settings.system_prompt
        return [Message("system", system)] if system else []

    def _steer(self, index: int) -> str | None:
        topics = self.settings.topics
        return self.settings.topic_template.format(topic=topics[index % len(topics)]) if topics else None

    def _write_round(self, drafts: list[_Draft]) -> list[_Draft]:
        """Every draft through `turns` user turns and replies; returns those with >= 1 turn."""
        active = drafts
        for _ in range(self.settings.turns):
            active = self._user_turns(active)
            active = self._replies(active)
            if not active:
                break
        done = [d for d in drafts if d.user_turns > 0 and d.messages[-1].role == "assistant"]
        self.counts.shortened += sum(d.user_turns < self.settings.turns for d in done)
        return done

    def _user_turns(self, drafts: list[_Draft]) -> list[_Draft]:
        """Write one user turn for each draft; keep the drafts whose turn passes every check."""
        if not drafts:
            return []
        prompts = []
        for draft in drafts:
            shown = _steered(draft.messages, draft.steer)
            prompts.append(pre_query_text(shown, tokenizer=self.tokenizer))
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        written = self.write([list(ids) for ids in encoded])
        if len(written) != len(drafts):
            raise ValueError(f"write() returned {len(written)} turns for {len(drafts)} prompts")
        kept = []
        for draft, ids in zip(drafts, written, strict=True):
            text, reason = self._user_text(ids)
            if reason is not None:
                self.counts.refused[reason] += 1
                continue
            draft.messages.append(Message("user", text))
            draft.user_turns += 1
            self.counts.user_turns += 1
            self.counts.prompt_tokens += len(ids)
            kept.append(draft)
        return kept

    def _user_text(self, ids: Sequence[int]) -> tuple[str, str | None]:
        """The written turn as text, or why it is refused."""
        if len(ids) >= self.settings.max_prompt_tokens:
            return "", "unfinished"
        if any(t in self._controls for t in ids):
            return "", "special_token"
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False).strip()
        if not text:
            return "", "empty"
        # Spelt-out control tokens ("<|im_start|>assistant" as plain text) become real ones when
        # the conversation is tokenized: the prompt would hold a turn the template never wrote.
        if any(t in self._controls for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]):
            return "", "role_marker"
        if self.check_prompt is not None:
            reason = self.check_prompt(text, ids)
            if reason is not None:
                return "", reason
        return text, None

    def _replies(self, drafts: list[_Draft]) -> list[_Draft]:
        """Answer each draft's last user turn; a draft whose prompt is too long ends before it."""
        if not drafts:
            return []
        texts = [render(d.messages, tokenizer=self.tokenizer, add_generation_prompt=True) for d in drafts]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        sent, prompts = [], []
        for draft, ids in zip(drafts, encoded, strict=True):
            if len(ids) > self.settings.max_context_tokens:
                self.counts.refused["context_too_long"] += 1
                draft.messages.pop()  # the unanswered user turn
                draft.user_turns -= 1
                self.counts.user_turns -= 1
                continue
            sent.append(draft)
            prompts.append(list(ids))
        if not prompts:
            return []
        replies = self.reply(prompts)
        if len(replies) != len(prompts):
            raise ValueError(f"reply() returned {len(replies)} replies for {len(prompts)} prompts")
        contents = self.tokenizer.batch_decode(replies, skip_special_tokens=True)
        for draft, ids, content in zip(sent, replies, contents, strict=True):
            draft.messages.append(Message("assistant", content))
            self.counts.replies += 1
            self.counts.reply_tokens += len(ids)
        return sent

    # ------------------------------------------------------------------ what is recorded
    def metadata(self) -> dict[str, Any]:
        s = self.settings
        return {
            **self.description,
            "samples": s.samples,
            "turns": s.turns,
            "max_prompt_tokens": s.max_prompt_tokens,
            "system_prompt": s.system_prompt,
            "topics": len(s.topics),
            "topic_template": s.topic_template if s.topics else None,
            "counts": self.counts.as_json(),
        }

    def summary(self) -> str:
        c = self.counts
        refused = ", ".join(f"{k} {n}" for k, n in sorted(c.refused.items())) or "none"
        return (
            f"self-prompting kept {c.kept} of {c.started} conversations in {c.rounds} rounds "
            f"({c.user_turns} user turns, {c.prompt_tokens} prompt tokens, {c.reply_tokens} reply "
            f"tokens); refused: {refused}"
        )


def _steered(messages: list[Message], steer: str | None) -> list[Message]:
    """`messages` as shown to the writer: the steering text joins (or becomes) the system message."""
    if steer is None:
        return messages
    if messages and messages[0].role == "system":
        return [Message("system", f"{messages[0].content}\n\n{steer}"), *messages[1:]]
    return [Message("system", steer), *messages]
