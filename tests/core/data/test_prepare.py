"""prepare_data end to end on the fixture files and chitchat, and load_prepared's checks."""

from __future__ import annotations

import importlib
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from dflash_core.config import PrepareDataConfig
from dflash_core.data.formats import Conversation, DataError, Message
from dflash_core.data.prepare import (
    FORMAT_VERSION,
    METADATA_FILE,
    TOKEN_FREQ_FILE,
    load_prepared,
    load_token_freq,
    prepare_data,
)
from dflash_core.data.templates import chat_template_sha256, tokenize_conversation
from tests.factories.tokenizers import make_chat_tokenizer

FIXTURES = Path(__file__).parents[2] / "fixtures" / "data"
SHAREGPT = str(FIXTURES / "sharegpt.json")
MESSAGES = str(FIXTURES / "messages.jsonl")
PRETOKENIZED = str(FIXTURES / "pretokenized.jsonl")


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


def _config(tmp_path: Path, **overrides) -> PrepareDataConfig:
    values = {
        "model": "tiny-test",
        "data": [SHAREGPT, MESSAGES, PRETOKENIZED],
        "output": tmp_path / "out",
        "seq_length": 256,
    }
    return PrepareDataConfig(**(values | overrides))


def _prepare(tmp_path: Path, tok, **overrides):
    return prepare_data(_config(tmp_path, **overrides), tokenizer=tok, tokenizer_fingerprint="fp-123")


def without(values: dict, *keys: str) -> dict:
    return {k: v for k, v in values.items() if k not in keys}


def _jsonl(path: Path, conversations: list[list[tuple[str, str]]]) -> str:
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in conversations]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_writes_dataset_token_freq_and_metadata(tmp_path, tok):
    report = _prepare(tmp_path, tok)
    out = tmp_path / "out"
    dataset, meta = load_prepared(out)

    # sharegpt 2 + messages 2 + pretokenized 2 good rows; line 7 of pretokenized has id 99999.
    assert report.rows_written == len(dataset) == 6
    assert Counter(dataset["source"]) == {SHAREGPT: 2, MESSAGES: 2, PRETOKENIZED: 2}
    assert dataset.features["input_ids"].feature.dtype == "int32"
    assert dataset.features["loss_mask"].feature.dtype == "int8"
    assert dataset.column_names == ["input_ids", "loss_mask", "source"]
    for ids, mask in zip(dataset["input_ids"], dataset["loss_mask"], strict=True):
        assert len(ids) == len(mask) and sum(mask) >= 1

    # The pre-tokenized row passes through untouched.
    rows = dict(zip(map(tuple, dataset["input_ids"]), dataset["loss_mask"], strict=True))
    assert rows[(300, 301, 302, 303)] == [1, 1, 1, 1]

    # token_freq counts exactly the tokens at loss-mask positions.
    freq = torch.load(out / TOKEN_FREQ_FILE, weights_only=True)
    expected = torch.zeros(len(tok), dtype=torch.int64)
    for ids, mask in zip(dataset["input_ids"], dataset["loss_mask"], strict=True):
        for t, m in zip(ids, mask, strict=True):
            expected[t] += m
    assert freq.dtype == torch.int64 and freq.shape == (len(tok),)
    assert torch.equal(freq, expected)
    assert torch.equal(load_token_freq(out), freq)
    assert int(freq[tok.convert_tokens_to_ids("<|im_end|>")]) == 5 + 1  # 5 replies + a pre-tokenized row
    assert int(freq[300]) == 1

    assert meta.format_version == FORMAT_VERSION
    assert meta.model == "tiny-test"
    assert meta.tokenizer_fingerprint == "fp-123"
    assert meta.chat_template_sha256 == chat_template_sha256(tok)
    assert meta.seq_length == 256 and meta.vocab_size == len(tok)
    assert meta.rows_written == 6
    assert meta.rows_skipped == {
        "bad_json": 1,
        "bad_loss_mask": 1,
        "bad_token_ids": 2,
        "empty_content": 1,
        "length_mismatch": 1,
        "missing_key": 3,
        "no_assistant_turn": 1,
        "not_an_object": 1,
        "unknown_role": 1,
    }
    assert meta.supervised_tokens == int(freq.sum())
    assert meta.total_tokens == sum(len(ids) for ids in dataset["input_ids"])
    assert [s.spec for s in meta.sources] == [SHAREGPT, MESSAGES, PRETOKENIZED]
    assert meta.sources[0].model_dump() == {
        "spec": SHAREGPT,
        "rows_read": 5,
        "rows_written": 2,
        "rows_truncated": 0,
        "rows_unused": 0,
        "rows_skipped": {"missing_key": 1, "no_assistant_turn": 1, "unknown_role": 1},
    }
    assert meta.created.endswith("+00:00")
    assert json.loads((out / METADATA_FILE).read_text()) == meta.model_dump(mode="json")


def test_report_names_file_line_and_reason_of_skipped_rows(tmp_path, tok):
    report = _prepare(tmp_path, tok)
    text = [str(e) for e in report.first_errors]
    known = "system, user, human, assistant, gpt, chatgpt, bing, bard, model"
    assert f"{SHAREGPT}:2: turn 2: unknown role 'tool' (known: {known})" in text
    assert f"{MESSAGES}:2: invalid JSON: Expecting ',' delimiter (column 51)" in text
    assert f"{PRETOKENIZED}:2: length mismatch: 3 input_ids vs 2 loss_mask" in text
    assert f"{PRETOKENIZED}:7: token id 99999 is out of range for vocab size {len(tok)}" in text
    summary = report.summary()
    assert "wrote 6 rows" in summary and "skipped 12 rows" in summary


def test_source_without_usable_rows_is_an_error_naming_it(tmp_path, tok):
    bad = str(FIXTURES / "all_bad.jsonl")
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, tok, data=[SHAREGPT, bad])
    message = str(info.value)
    assert f"data source {bad!r} has no usable row: all 3 rows were skipped" in message
    assert "the first of each kind:" in message
    assert f"{bad}:2: turn 1: unknown role 'narrator'" in message
    assert f"{bad}:1: no assistant turn" in message and f"{bad}:3: invalid JSON" in message
    assert not (tmp_path / "out").exists()


def test_empty_source_is_an_error(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no usable row: it is empty"):
        _prepare(tmp_path, tok, data=[str(empty)])


def test_truncation_and_min_supervised_tokens(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    turns = [
        [("user", "Hi"), ("assistant", "word " * 80)],  # reply cut short, still supervised
        [("user", "Hi " * 200), ("assistant", "cut off")],  # reply entirely past the cut
        [("user", "Hi"), ("assistant", "ok")],  # too few supervised tokens
        [("user", "Hi"), ("assistant", "Hello! How are you doing today?")],  # fits
    ]
    path.write_text(
        "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in t]}) + "\n" for t in turns)
    )
    conversations = [Conversation([Message(*m) for m in t], str(path), n) for n, t in enumerate(turns, 1)]
    full = [tokenize_conversation(c, tokenizer=tok, seq_length=None) for c in conversations]
    seq_length = len(full[3].input_ids) + 2
    assert len(full[0].input_ids) > seq_length and len(full[1].input_ids) > seq_length
    assert sum(full[2].loss_mask) < 4 <= sum(full[3].loss_mask)

    report = _prepare(tmp_path, tok, data=[str(path)], seq_length=seq_length, min_supervised_tokens=4)
    dataset, meta = load_prepared(tmp_path / "out")
    rows = sorted(zip(dataset["input_ids"], dataset["loss_mask"], strict=True), key=lambda r: -len(r[0]))
    assert rows == [
        (full[0].input_ids[:seq_length], full[0].loss_mask[:seq_length]),
        (full[3].input_ids, full[3].loss_mask),
    ]
    assert meta.rows_truncated == 1  # row 2 was truncated too, but skipped
    assert meta.rows_skipped == {"too_few_supervised": 2}
    reasons = {e.line: e.reason for e in report.first_errors}
    cut = f"after truncation to seq_length={seq_length} (min_supervised_tokens=4)"
    assert reasons[2] == f"0 supervised tokens {cut}"
    assert reasons[3].startswith(f"{sum(full[2].loss_mask)} supervised tokens")


def test_shuffle_is_seeded_and_max_samples_caps(tmp_path, tok):
    many = _jsonl(tmp_path / "many.jsonl", [[("user", f"Q{i}"), ("assistant", f"A{i}")] for i in range(200)])

    def order(seed: int) -> list[list[int]]:
        _prepare(tmp_path, tok, data=[many], seed=seed, max_samples=50)
        return load_prepared(tmp_path / "out")[0]["input_ids"]

    a = order(0)
    assert len(a) == 50
    assert order(0) == a  # rewrites the earlier output in place
    assert order(1) != a


def test_embedded_chitchat_tokenizes_only_what_max_samples_needs(tmp_path, tok):
    _prepare(tmp_path, tok, data=["chitchat"], seq_length=160, max_samples=50)
    dataset, meta = load_prepared(tmp_path / "out")
    chitchat = meta.sources[0]
    assert len(dataset) == meta.rows_written == chitchat.rows_written == 50
    assert set(dataset["source"]) == {"chitchat"}
    assert meta.rows_skipped["no_assistant_turn"] == 3150
    assert chitchat.rows_read == 7168
    assert chitchat.rows_read == 50 + sum(chitchat.rows_skipped.values()) + chitchat.rows_unused
    # Only what the quota needed was tokenized: most usable conversations are left untried.
    assert chitchat.rows_unused > 3500


def test_worker_processes_give_the_same_rows(tmp_path, tok):
    many = tmp_path / "many.jsonl"  # several tokenizer chunks, one bad row per ten
    many.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant" if i % 10 else "narrator", "content": f"Answer {i}."},
                    ]
                }
            )
            + "\n"
            for i in range(600)
        )
    )
    data = [SHAREGPT, MESSAGES, str(many)]
    _prepare(tmp_path, tok, data=data, max_samples=400, num_proc=1)
    one, meta_one = load_prepared(tmp_path / "out")
    _prepare(tmp_path, tok, data=data, max_samples=400, num_proc=2)
    two, meta_two = load_prepared(tmp_path / "out")
    assert one[:] == two[:] and len(one) == 400
    assert meta_one.sources == meta_two.sources


def test_small_sources_are_checked_even_when_the_quota_is_full(tmp_path, tok):
    big = _jsonl(tmp_path / "big.jsonl", [[("user", f"Q{i}"), ("assistant", f"A{i}")] for i in range(300)])
    # Parses fine, but every reply lies past seq_length: found only by tokenizing it.
    hopeless = _jsonl(tmp_path / "hopeless.jsonl", [[("user", "Hi " * 300), ("assistant", "late")]] * 3)
    with pytest.raises(
        DataError,
        match=r"'.*hopeless\.jsonl' has no usable row: all 3 rows were skipped "
        r"\(too_few_supervised 3\)",
    ):
        _prepare(tmp_path, tok, data=[big, hopeless], max_samples=1)

    # A usable small source that the quota left out is fine, and its rows are accounted for.
    _prepare(tmp_path, tok, data=[big, SHAREGPT], max_samples=1, seed=3)
    _, meta = load_prepared(tmp_path / "out")
    for s in meta.sources:
        assert s.rows_read == s.rows_written + sum(s.rows_skipped.values()) + s.rows_unused
    assert meta.rows_written == 1


def test_template_errors_skip_the_row_not_the_run(tmp_path):
    template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    tok = make_chat_tokenizer(chat_template=template)
    report = _prepare(tmp_path, tok, data=[SHAREGPT])
    assert report.rows_written == 1 and report.rows_skipped["template_error"] == 1
    error = next(e for e in report.first_errors if e.kind == "template_error")
    assert error.line == 1 and "no system role" in error.reason


def test_assistant_only_loss_off(tmp_path, tok):
    _prepare(tmp_path, tok, data=[SHAREGPT], assistant_only_loss=False)
    dataset, meta = load_prepared(tmp_path / "out")
    assert all(all(mask) for mask in dataset["loss_mask"]) and meta.assistant_only_loss is False


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, tok):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepare-data output"):
        _prepare(tmp_path, tok)
    assert (out / "precious.txt").read_text() == "keep me"


def test_vocab_size_pads_token_freq(tmp_path, tok):
    prepare_data(_config(tmp_path), tokenizer=tok, tokenizer_fingerprint="fp", vocab_size=len(tok) + 16)
    assert load_token_freq(tmp_path / "out").shape == (len(tok) + 16,)
    with pytest.raises(DataError, match="smaller than the tokenizer"):
        prepare_data(_config(tmp_path), tokenizer=tok, tokenizer_fingerprint="fp", vocab_size=10)


def test_load_prepared_rejects_what_prepare_data_did_not_write(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_prepared(tmp_path / "missing")
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match=r"is not a `dflash prepare-data` output \(no dflash_data.json\)"):
        load_prepared(tmp_path / "random")

    _prepare(tmp_path, tok)
    out = tmp_path / "out"
    raw = json.loads((out / METADATA_FILE).read_text())
    (out / METADATA_FILE).write_text(json.dumps(raw | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match=r"reads up to 1\. Upgrade dflash"):
        load_prepared(out)
    (out / METADATA_FILE).write_text(json.dumps(raw | {"rows_written": 99}))
    with pytest.raises(DataError, match=r"6 rows on disk but dflash_data\.json says 99"):
        load_prepared(out)
    (out / TOKEN_FREQ_FILE).unlink()
    with pytest.raises(DataError, match=r"no token_freq\.pt"):
        load_prepared(out)


def test_metadata_of_older_and_newer_writers(tmp_path, tok, caplog):
    _prepare(tmp_path, tok)
    out = tmp_path / "out"
    raw = json.loads((out / METADATA_FILE).read_text())
    # An older file without the keys added since format 1 shipped still loads, with defaults.
    later = ("rows_truncated", "chat_template_sha256", "sources", "regenerated", "self_prompted", "mix")
    (out / METADATA_FILE).write_text(json.dumps(without(raw, *later)))
    with caplog.at_level(logging.INFO, logger="dflash_core.data.metadata"):
        _, loaded = load_prepared(out)
    assert loaded.rows_truncated == 0 and loaded.chat_template_sha256 is None and loaded.sources == []
    assert "has no 'rows_truncated' (older format); assuming 0" in caplog.text
    # A key every version wrote is not guessed: the error names it.
    (out / METADATA_FILE).write_text(json.dumps(without(raw, "tokenizer_fingerprint")))
    with pytest.raises(
        DataError, match=r"tokenizer_fingerprint: Field required.*re-run `dflash prepare-data`"
    ):
        load_prepared(out)
    (out / METADATA_FILE).write_text(json.dumps(raw | {"rows_written": "six"}))
    with pytest.raises(DataError, match=r"rows_written: Input should be a valid integer"):
        load_prepared(out)
    # A newer writer's extra key (same format version) is dropped, and said so.
    (out / METADATA_FILE).write_text(json.dumps(raw | {"dedup": {"kind": "near"}}))
    with caplog.at_level(logging.INFO, logger="dflash_core.data.metadata"):
        _, loaded = load_prepared(out)
    assert loaded.model_dump(mode="json") == raw
    assert "has 'dedup', which this dflash does not know" in caplog.text


@pytest.mark.slow
def test_prepares_chitchat_with_the_smollm2_tokenizer(tmp_path):
    verifier = pytest.importorskip("dflash_core.verifier")
    if not hasattr(verifier, "load_tokenizer"):
        pytest.skip("dflash_core.verifier.load_tokenizer is not written yet")
    importlib.import_module("gguf")
    tokenizer = verifier.load_tokenizer("embedded:smollm2-135m-instruct")
    config = PrepareDataConfig(output=tmp_path / "out", max_samples=200, seq_length=512)
    report = prepare_data(config, tokenizer=tokenizer, tokenizer_fingerprint="smollm2")
    dataset, meta = load_prepared(tmp_path / "out")
    assert report.rows_written == len(dataset) == 200
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = dataset[0]
    supervised = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
    assert im_end in supervised
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\n")
    assert meta.chat_template_sha256 == chat_template_sha256(tokenizer)
