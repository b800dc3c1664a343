"""Readers: every source format becomes Conversation / TokenizedRow, and bad rows become RowError."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from dflash_core.data import formats
from dflash_core.data.formats import (
    Conversation,
    DataError,
    Message,
    RowError,
    TokenizedRow,
    parse_row,
    read_chitchat,
    read_source,
)

FIXTURES = Path(__file__).parents[2] / "fixtures" / "data"


def _read(name: str) -> tuple[str, list]:
    spec = str(FIXTURES / name)
    return spec, list(read_source(spec))


def _errors(items: list) -> dict[int | None, tuple[str, str]]:
    return {e.line: (e.kind, e.reason) for e in items if isinstance(e, RowError)}


def test_sharegpt_json_array_rows_and_errors():
    spec, items = _read("sharegpt.json")
    assert items[0] == Conversation(
        messages=[
            Message("system", "Be brief."),
            Message("user", "What is the capital of France?"),
            Message("assistant", "Paris."),
            Message("user", "And of Italy?"),
            Message("assistant", "Rome."),
        ],
        source=spec,
        line=1,
    )
    # `chatgpt` is a ShareGPT spelling of the assistant.
    assert items[4] == Conversation(
        [Message("user", "Hello!"), Message("assistant", "Hello! How are you doing today?")], spec, 5
    )
    errors = _errors(items)
    assert set(errors) == {2, 3, 4}
    assert errors[2][0] == "unknown_role" and "turn 2: unknown role 'tool'" in errors[2][1]
    assert errors[3] == ("missing_key", "turn 1: missing key 'from' or 'value'")
    assert errors[4] == ("no_assistant_turn", "no assistant turn (nothing to supervise)")
    assert str(items[3]) == f"{spec}:4: no assistant turn (nothing to supervise)"


def test_messages_jsonl_rows_and_errors_carry_line_numbers():
    spec, items = _read("messages.jsonl")
    good = [i for i in items if isinstance(i, Conversation)]
    assert [c.line for c in good] == [1, 6]
    assert good[0].messages == [
        Message("user", "Tell me a joke."),
        Message("assistant", "Why did the fox jump? To get over the lazy dog."),
    ]
    assert good[1].messages[0] == Message("user", "Parts work.")  # OpenAI text parts are joined
    errors = _errors(items)
    assert set(errors) == {2, 3, 5, 7}  # line 4 is blank: not a row
    assert errors[2][0] == "bad_json" and errors[2][1].startswith("invalid JSON: Expecting ',' delimiter")
    assert errors[3] == ("empty_content", "turn 2: empty content")
    assert errors[5][0] == "missing_key" and "found: prompt" in errors[5][1]
    assert errors[7] == ("not_an_object", "row is a JSON list, expected an object")
    assert all(e.source == spec for e in items if isinstance(e, RowError))


def test_pretokenized_rows_and_errors():
    spec, items = _read("pretokenized.jsonl")
    assert items[0] == TokenizedRow(
        input_ids=[1, 369, 201, 42, 75, 2, 201, 1, 67, 201, 327, 81, 2],
        loss_mask=[0] * 10 + [1, 1, 1],
        source=spec,
        line=1,
    )
    assert items[5] == TokenizedRow([300, 301, 302, 303], [1, 1, 1, 1], spec, 6)
    errors = _errors(items)
    assert errors[2] == ("length_mismatch", "length mismatch: 3 input_ids vs 2 loss_mask")
    assert errors[3][0] == "bad_token_ids"
    assert errors[4][0] == "bad_loss_mask"
    assert errors[5] == ("missing_key", "pre-tokenized row without 'loss_mask'")
    # Out-of-vocab ids are only detectable against a tokenizer: prepare_data rejects line 7.
    assert isinstance(items[6], TokenizedRow)


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"input_ids": [1, True], "loss_mask": [0, 1]}, "bad_token_ids"),
        ({"input_ids": [1, -2], "loss_mask": [0, 1]}, "bad_token_ids"),
        ({"input_ids": [], "loss_mask": []}, "bad_token_ids"),
        ({"messages": []}, "missing_key"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            "bad_content",
        ),
        ({"conversations": [{"from": 7, "value": "x"}]}, "unknown_role"),
    ],
)
def test_parse_row_rejects(row, kind):
    result = parse_row(row, source="s", line=9)
    assert isinstance(result, RowError) and result.kind == kind and result.line == 9


def test_pretokenized_bool_mask_becomes_ints():
    row = parse_row({"input_ids": [4, 5], "loss_mask": [False, True]}, source="s", line=1)
    assert row == TokenizedRow([4, 5], [0, 1], "s", 1)


def test_roles_from_either_spelling_in_either_container():
    row = parse_row(
        {"conversations": [{"role": "user", "content": "a"}, {"from": "gpt", "value": "b"}]},
        source="s",
        line=None,
    )
    assert row == Conversation([Message("user", "a"), Message("assistant", "b")], "s", None)


def test_broken_json_array_reports_where_it_broke():
    spec, items = _read("broken_array.json")
    assert len(items) == 1 and items[0].kind == "bad_json" and items[0].line == 5
    assert str(items[0]).startswith(f"{spec}:5: invalid JSON array")


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
    )
    assert [type(i) for i in read_source(str(path))] == [Conversation]


def test_unknown_source_and_wrong_suffix_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"unknown data source 'nope'.*sharegpt, ultrachat, chitchat"):
        read_source("nope")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"expected a \.json or \.jsonl file"):
        read_source(str(tmp_path / "rows.csv"))


def test_chitchat_alternates_speakers_into_user_and_assistant():
    items = list(read_chitchat())
    convs = [i for i in items if isinstance(i, Conversation)]
    assert len(items) == 7168 and len(convs) > 3000
    first = items[0]
    assert first.source == "chitchat" and first.line == 1
    # The package's first conversation: utterances of one sender are joined with newlines.
    assert first.messages[0] == Message("user", "Hello\nHow are you doing today?")
    assert first.messages[1] == Message("assistant", "whats up MD\nim doing good\nhow are you doing?")
    for conv in convs:
        roles = [m.role for m in conv.messages]
        assert roles[0] == "user"
        assert all(a != b for a, b in itertools.pairwise(roles))
    # Single-message conversations have no reply.
    assert {e.kind for e in items if isinstance(e, RowError)} <= {"no_assistant_turn", "empty_content"}


def test_chitchat_layout_errors_are_row_errors(tmp_path):
    path = tmp_path / "dataset.json"
    runs = [[{"text": "hi", "sender": "x"}], [{"text": "yo", "sender": "y"}]]
    path.write_text(json.dumps({"a": {"messages": runs}, "b": {"nothing": []}}))
    items = list(read_chitchat(path))
    assert items[0] == Conversation([Message("user", "hi"), Message("assistant", "yo")], "chitchat", 1)
    assert isinstance(items[1], RowError) and items[1].line == 2


@pytest.mark.parametrize(
    ("name", "repo", "split"),
    [
        ("sharegpt", "Aeala/ShareGPT_Vicuna_unfiltered", "train"),
        ("ultrachat", "HuggingFaceH4/ultrachat_200k", "train_sft"),
    ],
)
def test_hub_sources_load_the_public_datasets(monkeypatch, name, repo, split):
    calls = []
    rows = [
        {"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {
            "prompt": "p",
            "prompt_id": "x",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        },
        {"id": "3", "conversations": [{"from": "human", "value": "alone"}]},
    ]

    def fake_load(repo_: str, split_: str):
        calls.append((repo_, split_))
        return rows

    monkeypatch.setattr(formats, "load_hub_dataset", fake_load)
    items = list(read_source(name))
    assert calls == [(repo, split)]
    assert items[0] == Conversation([Message("user", "hi"), Message("assistant", "hello")], name, 1)
    assert items[1] == Conversation([Message("user", "q"), Message("assistant", "a")], name, 2)
    assert isinstance(items[2], RowError) and items[2].line == 3


def test_hub_failure_says_how_to_work_offline(monkeypatch):
    def offline(repo: str, split: str):
        raise ConnectionError("no network")

    monkeypatch.setattr(formats, "load_hub_dataset", offline)
    with pytest.raises(DataError, match=r"'sharegpt'.*Aeala/ShareGPT_Vicuna_unfiltered.*no network.*\.jsonl"):
        list(read_source("sharegpt"))
