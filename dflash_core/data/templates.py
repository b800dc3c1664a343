"""Render conversations with the verifier's chat template and build the assistant-only loss mask.

A row's `loss_mask` is 1 on the tokens the drafter is trained to predict: every token of an
assistant message's content, plus the end-of-turn token that closes it (the drafter must learn to
propose `<|im_end|>` too, or every reply ends with a rejected draft). The role header, system and
user turns, and the template's glue between turns are context (0).

How: render the conversation with `apply_chat_template(tokenize=False)` and find each assistant
content's character span: render once more with a marker in place of every content and check that
putting the contents back gives the real text (two renders per conversation); for templates that
look inside content, fall back to rendering each prefix `messages[:i]` with the generation prompt
(the reply starts where it ends). Then tokenize the text once with offsets and mark the tokens
that overlap a span, through the first control token after it. This works for any template,
ChatML-like or not, without `{% generation %}` markers.

Silent failure: a drafter trained on one template and served under another trains normally, then
accepts about one token per step, because every context it sees at serving time is new. So the
template applied here is fingerprinted (`chat_template_sha256`) and recorded with the data; the
tokenizer itself is fingerprinted by the caller.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

from dflash_core.data.formats import Conversation, DataError, Message, RowError, TokenizedRow

logger = logging.getLogger(__name__)


class TemplateError(ValueError):
    """One conversation cannot be rendered or masked; the row is skipped with this reason."""


def chat_template_of(tokenizer: Any) -> str:
    """The chat template `apply_chat_template` would use. Raises `DataError` if there is none."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:  # transformers raises ValueError when no template is set
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; conversations "
            "need one (use the instruct/chat model's tokenizer, or pre-tokenize the data yourself)"
        ) from exc
    return template


def chat_template_sha256(tokenizer: Any) -> str:
    """sha256 of the chat template text: recorded with the data so a template change is detectable."""
    return hashlib.sha256(chat_template_of(tokenizer).encode("utf-8")).hexdigest()


def check_tokenizer(tokenizer: Any) -> None:
    """Fail early, once, for problems that would otherwise fail every row."""
    chat_template_of(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "the tokenizer must be a fast (Rust `tokenizers`) tokenizer: loss masks need its offset mapping"
        )


@dataclass(frozen=True, slots=True)
class AssistantSpan:
    """Character offsets of one assistant turn in the rendered text.

    `content_start:content_end` is the message content; `turn_end` is where the rendered turn ends
    (the end-of-turn token lies in `content_end:turn_end`).
    """

    content_start: int
    content_end: int
    turn_end: int


def render(messages: list[Message], *, tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages`, as text."""
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # templates raise anything (e.g. "roles must alternate") for data they reject
        raise TemplateError(f"chat template rejected the conversation: {type(exc).__name__}: {exc}") from exc


def assistant_spans(messages: list[Message], *, tokenizer: Any) -> tuple[str, list[AssistantSpan]]:
    """Render `messages`; return the text and the span of every assistant turn, in order."""
    found = _spans_by_markers(messages, tokenizer=tokenizer)
    return found if found is not None else _spans_by_prefixes(messages, tokenizer=tokenizer)


# Private-use code points: never in real text, and left alone by `trim` and friends.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


def _spans_by_markers(messages: list[Message], *, tokenizer: Any) -> tuple[str, list[AssistantSpan]] | None:
    """Two renders per conversation: one with a marker in place of each content, one real.

    If putting the contents back where the markers are gives the real rendering, the template
    treats content as opaque and the content positions are exact. Templates that inspect or
    rewrite content (reasoning splits, tool-call parsing) fail the check; then `None`.
    """
    markers = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(messages))]
    try:
        skeleton = render(
            [Message(m.role, mark) for m, mark in zip(messages, markers, strict=True)], tokenizer=tokenizer
        )
    except TemplateError:
        return None  # the slow path renders the real content and reports the template's own error
    if skeleton.count(_MARK_OPEN) != len(messages):
        return None  # the template drops or repeats a message
    parts: list[str] = []
    starts: list[int] = []
    length = pos = 0
    for message, mark in zip(messages, markers, strict=True):
        at = skeleton.find(mark, pos)
        if at < 0:
            return None
        parts += [skeleton[pos:at], message.content]
        starts.append(length + at - pos)
        length += at - pos + len(message.content)
        pos = at + len(mark)
    parts.append(skeleton[pos:])
    text = "".join(parts)
    if text != render(messages, tokenizer=tokenizer):
        return None
    spans = [
        # The turn ends, at the latest, where the next message's content starts.
        AssistantSpan(start, start + len(m.content), starts[i + 1] if i + 1 < len(starts) else len(text))
        for i, (m, start) in enumerate(zip(messages, starts, strict=True))
        if m.role == "assistant"
    ]
    return text, spans


def _spans_by_prefixes(messages: list[Message], *, tokenizer: Any) -> tuple[str, list[AssistantSpan]]:
    """Slow path for templates that look at content: two renders per assistant turn."""
    text = render(messages, tokenizer=tokenizer)
    spans: list[AssistantSpan] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = cursor
        if i > 0:
            # The prompt the verifier sees at serving time ends with the generation prompt; the
            # reply starts right after it. Templates that rewrite history (e.g. dropping reasoning
            # of earlier turns) are not prefix-stable; then search from the previous reply's end.
            prompt = render(messages[:i], tokenizer=tokenizer, add_generation_prompt=True)
            if text.startswith(prompt):
                start = max(start, len(prompt))
        content_start, content_end = _locate(text, message.content, start=start, turn=i + 1)
        turn_text = render(messages[: i + 1], tokenizer=tokenizer)
        stable = text.startswith(turn_text) and len(turn_text) > content_end
        turn_end = len(turn_text) if stable else len(text)
        spans.append(AssistantSpan(content_start, content_end, turn_end))
        cursor = content_end
    return text, spans


def _locate(text: str, content: str, *, start: int, turn: int) -> tuple[int, int]:
    # Some templates trim message content (`| trim`, Qwen3's reasoning split); try the stripped form.
    for candidate in (content, content.strip()):
        at = text.find(candidate, start)
        if at >= 0:
            return at, at + len(candidate)
    raise TemplateError(
        f"turn {turn}: the assistant content does not appear in the rendered chat template "
        "(the template rewrites message content), so its loss mask cannot be placed"
    )


def control_token_ids(tokenizer: Any) -> set[int]:
    """Ids of special tokens (`<|im_end|>`, `<|eot_id|>`, eos...): the candidates for end-of-turn."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def assistant_loss_mask(
    offsets: list[tuple[int, int]],
    input_ids: list[int],
    *,
    spans: list[AssistantSpan],
    control_ids: set[int],
) -> list[int]:
    """1 for tokens overlapping an assistant content span, and up to its closing control token.

    Whitespace the template puts between content and end-of-turn (Llama-2's `' ' + eos`) is
    generated by the model too, so it is supervised. If a template closes turns without a control
    token, the first token after the content stands in for it.
    """
    mask = [0] * len(input_ids)
    t = 0  # spans and tokens are both in text order: one pass over the tokens
    for span in spans:
        while t < len(offsets) and offsets[t][1] <= span.content_start:
            t += 1
        while t < len(offsets) and offsets[t][0] < span.content_end:
            mask[t] = 1
            t += 1
        # Close the turn: through the first control token before `turn_end`, else one token.
        end = t
        while end < len(offsets) and offsets[end][0] < span.turn_end and input_ids[end] not in control_ids:
            end += 1
        if end >= len(offsets) or offsets[end][0] >= span.turn_end:
            end = t  # no control token closes this turn
        if t < len(offsets) and offsets[t][0] < span.turn_end:
            for k in range(t, end + 1):
                mask[k] = 1
            t = end + 1
    return mask


def tokenize_conversation(
    conversation: Conversation,
    *,
    tokenizer: Any,
    seq_length: int | None,
    assistant_only_loss: bool = True,
) -> TokenizedRow:
    """Render, tokenize, mask and truncate one conversation. Raises `TemplateError` for a bad row.

    `seq_length=None` keeps every token. `assistant_only_loss=False` supervises every token.
    """
    result = tokenize_conversations(
        [conversation], tokenizer=tokenizer, seq_length=seq_length, assistant_only_loss=assistant_only_loss
    )[0]
    if isinstance(result, RowError):
        raise TemplateError(result.reason)
    return result


def tokenize_conversations(
    conversations: list[Conversation],
    *,
    tokenizer: Any,
    seq_length: int | None,
    assistant_only_loss: bool = True,
    control_ids: set[int] | None = None,
) -> list[TokenizedRow | RowError]:
    """`tokenize_conversation` for many rows at once (one batched, multi-threaded tokenizer call).

    A conversation the template rejects comes back as a `RowError` (kind `template_error`) in its place.

    Tokenized without adding special tokens: the template already writes BOS where the model wants
    it, and `apply_chat_template(tokenize=True)` and vLLM's chat endpoint do the same, so adding
    them here would train on a doubled BOS that serving never shows.
    """
    rendered: list[tuple[str, list[AssistantSpan]] | RowError] = []
    for conversation in conversations:
        try:
            rendered.append(assistant_spans(conversation.messages, tokenizer=tokenizer))
        except TemplateError as exc:
            rendered.append(RowError(conversation.source, conversation.line, str(exc), "template_error"))
    texts = [r[0] for r in rendered if not isinstance(r, RowError)]
    encodings: Any = {"input_ids": [], "offset_mapping": []}
    if texts:
        encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids = control_token_ids(tokenizer) if control_ids is None else control_ids
    results: list[TokenizedRow | RowError] = []
    k = 0
    for conversation, item in zip(conversations, rendered, strict=True):
        if isinstance(item, RowError):
            results.append(item)
            continue
        input_ids: list[int] = list(encodings["input_ids"][k])
        if assistant_only_loss:
            offsets = encodings["offset_mapping"][k]
            loss_mask = assistant_loss_mask(offsets, input_ids, spans=item[1], control_ids=ids)
        else:
            loss_mask = [1] * len(input_ids)
        k += 1
        row = TokenizedRow(input_ids, loss_mask, source=conversation.source, line=conversation.line)
        results.append(row if seq_length is None else truncate(row, seq_length=seq_length))
    return results


def truncate(row: TokenizedRow, *, seq_length: int) -> TokenizedRow:
    """Keep the first `seq_length` tokens (and mask entries) of a row."""
    if len(row.input_ids) <= seq_length:
        return row
    return replace(row, input_ids=row.input_ids[:seq_length], loss_mask=row.loss_mask[:seq_length])
