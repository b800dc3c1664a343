"""Chat templates and the assistant-only loss mask, checked token by token."""

from __future__ import annotations

import hashlib

import pytest

from dflash_core.data.formats import Conversation, DataError, Message
from dflash_core.data.templates import (
    TemplateError,
    _spans_by_markers,
    _spans_by_prefixes,
    assistant_spans,
    chat_template_sha256,
    check_tokenizer,
    tokenize_conversation,
)
from tests.factories.tokenizers import IM_END, IM_START, make_chat_tokenizer

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


def _expected(tok, segments: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Token ids and mask built by hand from (text, supervised) pieces of the ChatML rendering."""
    ids: list[int] = []
    mask: list[int] = []
    for text, supervised in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [supervised] * len(piece)
    return ids, mask


def _conv(*turns: tuple[str, str]) -> Conversation:
    return Conversation([Message(role, content) for role, content in turns], source="t", line=1)  # type: ignore[arg-type]


def test_only_assistant_content_and_its_end_of_turn_are_supervised(tok):
    conv = _conv(
        ("system", "Be brief."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome, of course."),
    )
    row = tokenize_conversation(conv, tokenizer=tok, seq_length=None)
    ids, mask = _expected(
        tok,
        [
            (
                f"{IM_START}system\nBe brief.{IM_END}\n"
                f"{IM_START}user\nWhat is the capital of France?{IM_END}\n{IM_START}assistant\n",
                0,
            ),
            ("Paris.", 1),
            (IM_END, 1),
            (f"\n{IM_START}user\nAnd of Italy?{IM_END}\n{IM_START}assistant\n", 0),
            ("Rome, of course.", 1),
            (IM_END, 1),
            ("\n", 0),
        ],
    )
    # The hand-built ids are the real tokenization of the rendered chat (no merge across pieces).
    assert row.input_ids == tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conv.messages], tokenize=True, return_dict=False
    )
    assert row.input_ids == ids
    assert row.loss_mask == mask
    supervised = tok.decode([t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m])
    assert supervised == f"Paris.{IM_END}Rome, of course.{IM_END}"
    assert (row.source, row.line) == ("t", 1)


def test_default_system_prompt_and_repeated_text_are_not_supervised(tok):
    # "a" occurs in the template's default system prompt and in the user turn before the reply:
    # a naive text search would put the mask there.
    conv = _conv(("user", "a"), ("assistant", "a"), ("user", "a"), ("assistant", "a"))
    row = tokenize_conversation(conv, tokenizer=tok, seq_length=None)
    ids, mask = _expected(
        tok,
        [
            (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\na{IM_END}\n{IM_START}assistant\n", 0),
            ("a", 1),
            (IM_END, 1),
            (f"\n{IM_START}user\na{IM_END}\n{IM_START}assistant\n", 0),
            ("a", 1),
            (IM_END, 1),
            ("\n", 0),
        ],
    )
    assert (row.input_ids, row.loss_mask) == (ids, mask)


def test_system_and_user_tokens_are_never_supervised(tok):
    conv = _conv(("system", "Only context."), ("user", "Only context too."), ("assistant", "Reply."))
    row = tokenize_conversation(conv, tokenizer=tok, seq_length=None)
    first = row.loss_mask.index(1)
    assert tok.decode(row.input_ids[:first]).endswith(f"{IM_START}assistant\n")
    assert sum(row.loss_mask) == len(tok("Reply.", add_special_tokens=False)["input_ids"]) + 1


def test_truncation_keeps_the_prefix(tok):
    conv = _conv(("user", "Hello!"), ("assistant", "Hello! How are you doing today?"))
    full = tokenize_conversation(conv, tokenizer=tok, seq_length=None)
    cut = tokenize_conversation(conv, tokenizer=tok, seq_length=len(full.input_ids) - 5)
    assert len(cut.input_ids) == len(full.input_ids) - 5
    assert cut.input_ids == full.input_ids[:-5] and cut.loss_mask == full.loss_mask[:-5]
    assert tokenize_conversation(conv, tokenizer=tok, seq_length=10_000) == full


def test_assistant_only_loss_off_supervises_everything(tok):
    conv = _conv(("user", "Hi"), ("assistant", "Hello"))
    row = tokenize_conversation(conv, tokenizer=tok, seq_length=None, assistant_only_loss=False)
    assert row.loss_mask == [1] * len(row.input_ids)


def test_bos_is_not_added_twice():
    tok = make_chat_tokenizer(bos_token="<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    # The tokenizer would prepend BOS to any text, and the template writes one itself.
    assert tok("x")["input_ids"][0] == bos
    row = tokenize_conversation(_conv(("user", "Hi"), ("assistant", "Hello")), tokenizer=tok, seq_length=None)
    assert row.input_ids[0] == bos and row.input_ids[1] != bos
    assert row.input_ids.count(bos) == 1


def test_template_that_trims_content_still_masks_the_reply():
    template = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] | trim) + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = make_chat_tokenizer(chat_template=template)
    row = tokenize_conversation(
        _conv(("user", "Hi"), ("assistant", "  Hello there  ")), tokenizer=tok, seq_length=None
    )
    supervised = tok.decode([t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m])
    assert supervised == f"Hello there{IM_END}"


def test_template_without_control_token_supervises_the_next_token():
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tok = make_chat_tokenizer(chat_template=template)
    row = tokenize_conversation(_conv(("user", "Hi"), ("assistant", "Hello")), tokenizer=tok, seq_length=None)
    supervised = tok.decode([t for t, m in zip(row.input_ids, row.loss_mask, strict=True) if m])
    assert supervised == "Hello\n"


def test_template_that_rejects_a_conversation_raises_template_error():
    template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    tok = make_chat_tokenizer(chat_template=template)
    with pytest.raises(TemplateError, match="no system role"):
        tokenize_conversation(
            _conv(("system", "s"), ("user", "u"), ("assistant", "a")), tokenizer=tok, seq_length=None
        )


def test_template_that_drops_content_raises_template_error():
    tok = make_chat_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(TemplateError, match="turn 2: the assistant content does not appear"):
        assistant_spans([Message("user", "u"), Message("assistant", "reply")], tokenizer=tok)


def test_chat_template_sha256_and_missing_template(tok):
    assert chat_template_sha256(tok) == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    other = make_chat_tokenizer(system_prompt="You are a pirate.")
    assert chat_template_sha256(other) != chat_template_sha256(tok)
    with pytest.raises(DataError, match="has no chat template"):
        check_tokenizer(make_chat_tokenizer(chat_template=""))


def test_fast_and_slow_span_finders_agree(tok):
    conversations = [
        [Message("user", "a"), Message("assistant", "a"), Message("user", "b"), Message("assistant", "a b")],
        [Message("system", "S"), Message("user", "Hi"), Message("assistant", "Hello!\nHow are you?")],
        [Message("assistant", "I start."), Message("user", "Ok"), Message("assistant", "Done.")],
    ]
    for messages in conversations:
        fast = _spans_by_markers(messages, tokenizer=tok)
        slow = _spans_by_prefixes(messages, tokenizer=tok)
        assert fast is not None and fast[0] == slow[0]
        assert [(s.content_start, s.content_end) for s in fast[1]] == [
            (s.content_start, s.content_end) for s in slow[1]
        ]
        text = fast[0]
        assert [text[s.content_start : s.content_end] for s in fast[1]] == [
            m.content for m in messages if m.role == "assistant"
        ]
