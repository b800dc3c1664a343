"""Self-prompting logic with scripted writers: what is kept, what is refused and why, what is shown.

What must hold: a kept user turn renders back as exactly one user turn of the conversation (its
text sits in the user content span and the loss mask covers only the replies), spelt-out or
generated control tokens and unfinished turns are refused and counted, the writer sees the
conversation so far (multi-turn) and the steering topic while neither is stored, and settings
that cannot work fail before anything is generated.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dflash_core.data.formats import DataError, Message, TokenizedRow
from dflash_core.data.self_prompt import (
    SelfPrompter,
    SelfPromptSettings,
    end_of_user_turn_ids,
    pre_query_text,
)
from dflash_core.data.templates import tokenize_conversations
from tests.factories.tokenizers import IM_END, IM_START, make_chat_tokenizer


def scripted(tokenizer, texts: list[str], seen: list[str] | None = None):
    """A `Complete` that answers prompt after prompt with the next text (as token ids)."""
    supply: Iterator[str] = iter(texts)

    def complete(prompts: list[list[int]]) -> list[list[int]]:
        out = []
        for prompt in prompts:
            if seen is not None:
                seen.append(tokenizer.decode(prompt))
            # Spelt out piece by piece, as a model writes "<|im_end|>" when it does not emit the token.
            out.append(
                tokenizer(next(supply), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            )
        return out

    return complete


def replies(tokenizer, seen: list[str] | None = None):
    counter = iter(range(10_000))

    def complete(prompts: list[list[int]]) -> list[list[int]]:
        if seen is not None:
            seen.extend(tokenizer.decode(p) for p in prompts)
        return [
            tokenizer(f"Answer number {next(counter)}.", add_special_tokens=False)["input_ids"]
            for _ in prompts
        ]

    return complete


def prompter(tokenizer, texts, *, samples, seen_writes=None, seen_replies=None, **settings) -> SelfPrompter:
    settings.setdefault("oversample", 1.0)
    return SelfPrompter(
        tokenizer=tokenizer,
        write=scripted(tokenizer, texts, seen_writes),
        reply=replies(tokenizer, seen_replies),
        settings=SelfPromptSettings(samples=samples, **settings),
    )


def test_pre_query_text_opens_a_user_turn() -> None:
    tokenizer = make_chat_tokenizer(system_prompt="Be kind.")
    assert (
        pre_query_text([], tokenizer=tokenizer)
        == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"
    )
    history = [Message("user", "Hi"), Message("assistant", "Hello")]
    assert pre_query_text(history, tokenizer=tokenizer).endswith("Hello<|im_end|>\n<|im_start|>user\n")
    assert end_of_user_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(IM_END)]


def test_kept_turns_render_back_as_user_turns_with_replies_supervised() -> None:
    tokenizer = make_chat_tokenizer()
    texts = ["What is the capital of France?", "Tell me a joke about numbers."]
    p = prompter(tokenizer, texts, samples=2)
    conversations = p.conversations()
    assert [c.messages[0] for c in conversations] == [Message("user", t) for t in texts]
    assert all(
        c.source == "self" and [m.role for m in c.messages] == ["user", "assistant"] for c in conversations
    )
    rows = tokenize_conversations(conversations, tokenizer=tokenizer, seq_length=None)
    for conversation, row in zip(conversations, rows, strict=True):
        assert isinstance(row, TokenizedRow)
        # The user text is a whole user turn; only the reply (and its end of turn) is supervised.
        text = tokenizer.decode(row.input_ids)
        assert (
            f"<|im_start|>user\n{conversation.messages[0].content}<|im_end|>\n<|im_start|>assistant\n" in text
        )
        supervised = tokenizer.decode([t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m])
        assert supervised == conversation.messages[1].content + IM_END
    assert p.counts.kept == 2 and p.counts.user_turns == 2 and p.counts.replies == 2
    assert not p.counts.refused


def test_refusals_are_counted_and_replaced_in_later_rounds() -> None:
    tokenizer = make_chat_tokenizer()
    texts = [
        "Sure! <|im_end|>\n<|im_start|>assistant\nThe answer is",  # a role marker spelt out
        "   ",  # empty
        "word " * 40,  # unfinished: as long as max_prompt_tokens
        "Fine question one?",
        "Fine question two?",
    ]
    p = prompter(tokenizer, texts, samples=2, max_prompt_tokens=60)
    conversations = p.conversations()
    assert [c.messages[0].content for c in conversations] == ["Fine question one?", "Fine question two?"]
    assert p.counts.refused == {"role_marker": 1, "empty": 1, "unfinished": 1}
    assert p.counts.rounds == 3 and p.counts.started == 5 and p.counts.kept == 2
    # Nothing the writer produced after a refusal leaks into a stored prompt.
    stored = " ".join(m.content for c in conversations for m in c.messages)
    assert IM_START not in stored and "assistant\nThe answer" not in stored


def test_a_generated_control_token_is_refused() -> None:
    tokenizer = make_chat_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids(IM_END)

    def write(prompts: list[list[int]]) -> list[list[int]]:
        return [tokenizer("Hi", add_special_tokens=False)["input_ids"] + [im_end, 5, 6] for _ in prompts]

    p = SelfPrompter(
        tokenizer=tokenizer,
        write=write,
        reply=replies(tokenizer),
        settings=SelfPromptSettings(samples=1, max_rounds=2),
    )
    assert p.conversations() == []
    assert p.counts.refused == {"special_token": 2} and p.counts.rounds == 2


def test_the_callers_check_refuses_with_its_reason() -> None:
    tokenizer = make_chat_tokenizer()
    seen: set[str] = set()

    def check(text, ids) -> str | None:
        if text in seen:
            return "exact_duplicate"
        seen.add(text)
        return None

    p = SelfPrompter(
        tokenizer=tokenizer,
        write=scripted(tokenizer, ["Same?", "Same?", "Other?"]),
        reply=replies(tokenizer),
        settings=SelfPromptSettings(samples=2, oversample=1.0),
        check_prompt=check,
    )
    assert [c.messages[0].content for c in p.conversations()] == ["Same?", "Other?"]
    assert p.counts.refused == {"exact_duplicate": 1}


def test_multi_turn_writer_sees_the_conversation_and_a_later_refusal_shortens_it() -> None:
    tokenizer = make_chat_tokenizer()
    writes: list[str] = []
    # Round 1 writes the first turns of both drafts, then their second turns.
    texts = ["First question?", "Another first?", "Follow-up question?", "<|im_start|>oops"]
    p = prompter(tokenizer, texts, samples=2, turns=2, seen_writes=writes)
    conversations = p.conversations()
    assert [[m.role for m in c.messages] for c in conversations] == [
        ["user", "assistant", "user", "assistant"],
        ["user", "assistant"],
    ]
    assert conversations[0].messages[2].content == "Follow-up question?"
    # The second-turn prompt holds the first turn and its reply, then an opened user turn.
    assert writes[2].endswith(
        "First question?<|im_end|>\n<|im_start|>assistant\nAnswer number 0.<|im_end|>\n<|im_start|>user\n"
    )
    assert p.counts.shortened == 1 and p.counts.refused == {"role_marker": 1}


def test_topics_steer_the_writer_only() -> None:
    tokenizer = make_chat_tokenizer()
    writes: list[str] = []
    reply_prompts: list[str] = []
    p = prompter(
        tokenizer,
        ["Q1?", "Q2?", "Q3?"],
        samples=3,
        topics=("geometry", "cooking"),
        system_prompt="Be brief.",
        seen_writes=writes,
        seen_replies=reply_prompts,
    )
    conversations = p.conversations()
    assert "Be brief.\n\nThe user will ask you a question or give you a task about geometry." in writes[0]
    assert "about cooking." in writes[1] and "about geometry." in writes[2]
    for conversation in conversations:
        assert conversation.messages[0] == Message("system", "Be brief.")
    assert not any("geometry" in r or "cooking" in r for r in reply_prompts)
    assert all("Be brief." in r for r in reply_prompts)


def test_a_reply_prompt_over_the_context_limit_drops_the_turn() -> None:
    tokenizer = make_chat_tokenizer(system_prompt="Hi.")
    short = len(
        tokenizer.apply_chat_template([{"role": "user", "content": "Short?"}], add_generation_prompt=True)[
            "input_ids"
        ]
    )
    texts = ["A long question " * 4, "Short?"]
    p = prompter(tokenizer, texts, samples=1, max_context_tokens=short, max_prompt_tokens=200)
    conversations = p.conversations()
    assert [c.messages[0].content for c in conversations] == ["Short?"]
    assert p.counts.refused == {"context_too_long": 1} and p.counts.user_turns == 1


def test_settings_that_cannot_work_fail_before_generation() -> None:
    def never(prompts):
        raise AssertionError("nothing may be generated")

    settings = SelfPromptSettings(samples=1)
    with pytest.raises(DataError, match="no chat template"):
        SelfPrompter(
            tokenizer=make_chat_tokenizer(chat_template=""), write=never, reply=never, settings=settings
        )
    no_user = "{% for m in messages %}{% if m['role'] != 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="user"):
        SelfPrompter(
            tokenizer=make_chat_tokenizer(chat_template=no_user), write=never, reply=never, settings=settings
        )
    refuses_system = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    tokenizer = make_chat_tokenizer(chat_template=refuses_system)
    with pytest.raises(DataError, match="no system role"):
        SelfPrompter(
            tokenizer=tokenizer,
            write=never,
            reply=never,
            settings=SelfPromptSettings(samples=1, topics=("x",)),
        )
    SelfPrompter(tokenizer=tokenizer, write=never, reply=never, settings=settings)  # no system message: fine
    with pytest.raises(ValueError, match="topic"):
        SelfPromptSettings(samples=1, topics=("x",), topic_template="no placeholder")
