"""Response regeneration: `prepare-data --regenerate-with` against a real service on 127.0.0.1.

What must hold: every assistant turn of the prepared data is the verifier's own greedy reply to the
conversation so far (checked against `model.generate` turn by turn), and the metadata says so; a
service whose tokenizer differs is refused naming both sides; an unreachable endpoint, a prompt the
service rejects and an endpoint that died all end in a clear `GenerateError`, never a hang; a dead
endpoint among live ones only costs a retry. The round-by-round logic is tested on its own with a
plain `complete` function.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dflash_core.config import PrepareDataConfig
from dflash_core.data.formats import Conversation, Message, RowError, TokenizedRow
from dflash_core.data.prepare import load_prepared, prepare_data
from dflash_core.data.regenerate import end_of_turn_ids, regenerate_conversations
from dflash_core.data.templates import render, tokenize_conversation
from dflash_core.verifier import load_verifier, tokenizer_fingerprint
from services.cli.main import main
from services.hidden_states.generate_client import GenerateClient, GenerateError, regenerator_for
from services.hidden_states.server import HiddenStateServer
from tests.factories.chats import write_chats
from tests.factories.services import running_service
from tests.factories.tokenizers import IM_END, make_chat_tokenizer
from tests.factories.verifiers import make_tiny_verifier

MAX_NEW_TOKENS = 10
SEQ_LENGTH = 512

# A multi-turn conversation, one with its own system prompt, and single-turn chats.
MULTI_TURN = [
    ("user", "Hello! How are you doing today?"),
    ("assistant", "I am doing well, thank you for asking."),
    ("user", "What is the capital of France?"),
    ("assistant", "Paris."),
    ("user", "Tell me a joke about numbers."),
    ("assistant", "Seven ate nine."),
]
WITH_SYSTEM = [("system", "You answer briefly."), ("user", "def main():"), ("assistant", "return 42")]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def verifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = make_tiny_verifier(
        tmp_path_factory.mktemp("verifier"), num_layers=2, hidden_size=128, intermediate_size=256
    )
    assert tiny.path is not None
    return tiny.path


@pytest.fixture(scope="module")
def reference(verifier_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The saved verifier through the real loader, as the service loads it (float32, CPU)."""
    return load_verifier(str(verifier_path), device="cpu")


@pytest.fixture(scope="module")
def server(verifier_path: Path) -> Iterator[HiddenStateServer]:
    with running_service(verifier_path, target_layer_ids=[1]) as server:
        yield server


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", count=3, seed=1)
    with path.open("a") as f:
        for turns in (MULTI_TURN, WITH_SYSTEM):
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    return path


def _config(tmp_path: Path, data_file: Path, **overrides: object) -> PrepareDataConfig:
    values: dict[str, object] = {
        "data": [str(data_file)],
        "output": tmp_path / "out",
        "seq_length": SEQ_LENGTH,
        "regenerate_max_new_tokens": MAX_NEW_TOKENS,
    }
    return PrepareDataConfig(**(values | overrides))


def _greedy_conversation(
    turns: list[tuple[str, str]], *, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> list[Message]:
    """The oracle: each assistant turn replaced, in order, by `model.generate`'s greedy reply to the
    conversation so far, cut at the end-of-turn token and decoded as text."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    messages = [Message(role, content) for role, content in turns]  # type: ignore[arg-type]
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        text = render(messages[:i], tokenizer=tokenizer, add_generation_prompt=True)
        prompt = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            output = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=[im_end],
            )
        reply = output[0, prompt.shape[1] :].tolist()
        if reply and reply[-1] == im_end:
            reply = reply[:-1]
        messages[i] = Message("assistant", tokenizer.decode(reply, skip_special_tokens=True))
    return messages


def _all_turns(data_file: Path) -> list[list[tuple[str, str]]]:
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    return [[(m["role"], m["content"]) for m in row["messages"]] for row in rows]


# ---------------------------------------------------------------------------- through the service


def test_prepared_turns_are_the_verifiers_greedy_replies(
    tmp_path, server, reference, data_file, verifier_path
):
    model, tokenizer = reference
    config = _config(tmp_path, data_file, model=str(verifier_path))
    fingerprint = tokenizer_fingerprint(tokenizer)
    with GenerateClient([server.address]) as client:
        regenerate = regenerator_for(client, config, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint)
        report = prepare_data(
            config, tokenizer=tokenizer, tokenizer_fingerprint=fingerprint, regenerate=regenerate
        )

    expected_conversations = [
        _greedy_conversation(turns, model=model, tokenizer=tokenizer) for turns in _all_turns(data_file)
    ]
    # The verifier's replies differ from the dataset's (else this test would prove nothing).
    multi = expected_conversations[3]
    assert [m.content for m in multi if m.role == "assistant"] != [
        c for r, c in MULTI_TURN if r == "assistant"
    ]
    expected = sorted(
        (row.input_ids, row.loss_mask)
        for row in (
            tokenize_conversation(
                Conversation(m, source="x", line=None), tokenizer=tokenizer, seq_length=SEQ_LENGTH
            )
            for m in expected_conversations
        )
    )
    dataset, metadata = load_prepared(config.output)
    assert sorted((list(r["input_ids"]), list(r["loss_mask"])) for r in dataset) == expected

    regenerated = metadata.regenerated
    assert regenerated == report.metadata.regenerated
    assert regenerated["service"]["verifier_name_or_path"] == str(verifier_path)
    assert regenerated["service"]["endpoints"] == [server.address]
    assert regenerated["service"]["tokenizer_sha256"] == fingerprint
    assert regenerated["params"] == {
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "stop_token_ids": [tokenizer.convert_tokens_to_ids(IM_END)],
    }
    counts = regenerated["counts"]
    assert counts["conversations"] == counts["regenerated"] == 5
    assert counts["turns"] == 3 + 3 + 1
    assert counts["too_long"] == counts["truncated"] == counts["kept_as_is"] == 0


def test_a_service_with_another_tokenizer_is_refused_through_the_cli(tmp_path, server, data_file, capsys):
    # Same vocabulary, another chat template: token ids agree, rendered prompts would not.
    other = make_chat_tokenizer(system_prompt="You are someone else.")
    other_path = tmp_path / "other-model"
    other.save_pretrained(other_path)
    rc = main(["prepare-data", "--model", str(other_path), "--data", str(data_file), "--output",
               str(tmp_path / "out"), "--regenerate-with", server.address])  # fmt: skip
    assert rc == 2
    message = capsys.readouterr().out
    served = server.backend.info.fingerprint
    assert served.tokenizer_sha256[:16] in message
    assert tokenizer_fingerprint(other)[:16] in message
    assert served.name_or_path in message and str(other_path) in message
    assert not (tmp_path / "out").exists()


def test_cli_regenerates_and_records_it(tmp_path, server, data_file, verifier_path, capsys):
    rc = main(["prepare-data", "--model", str(verifier_path), "--data", str(data_file), "--output",
               str(tmp_path / "out"), "--regenerate-with", f"http://{server.address}/v1",
               "--regenerate-max-new-tokens", str(MAX_NEW_TOKENS), "--max-samples", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    assert "regenerated 2 of 2 conversations" in capsys.readouterr().out
    _, metadata = load_prepared(tmp_path / "out")
    assert metadata.rows_written == 2
    # max_samples 2: only the two conversations used were regenerated, not the whole file.
    assert metadata.regenerated["counts"]["conversations"] == 2


# ---------------------------------------------------------------------------- the client's errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_a_clear_error_not_a_hang():
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(GenerateError, match=f"{address} did not answer GetInfo within 1 s"):
        GenerateClient([address], connect_timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_a_rejected_prompt_names_the_endpoint_and_status_without_retrying(server):
    with GenerateClient([server.address], max_attempts=5, backoff_s=10.0) as client:
        too_long = [[5] * client.max_length]
        start = time.monotonic()
        with pytest.raises(GenerateError, match=f"{server.address}: INVALID_ARGUMENT: prompt 0"):
            client.complete(too_long, max_new_tokens=4)
        assert time.monotonic() - start < 5  # no backoff: INVALID_ARGUMENT is not retried


def test_a_dead_endpoint_costs_a_retry_and_replies_keep_prompt_order(
    server, verifier_path, reference, caplog
):
    model, _ = reference
    prompts = [[1, 9, 40 + i] for i in range(5)]
    with running_service(verifier_path, target_layer_ids=[1]) as doomed:
        client = GenerateClient([doomed.address, server.address], batch_size=2, backoff_s=0.01)
    with client:  # `doomed` is stopped now; the least busy endpoint is tried first, so it gets batches
        replies = client.complete(prompts, max_new_tokens=6)
    assert f"failed on {doomed.address}: UNAVAILABLE" in caplog.text  # the failover did happen
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
            )
        expected = output[0, len(prompt) :].tolist()
        eos = model.generation_config.eos_token_id
        assert reply == (expected[:-1] if expected[-1] == eos else expected)


def test_retries_that_run_out_name_the_endpoint_and_status(verifier_path):
    with running_service(verifier_path, target_layer_ids=[1]) as doomed:
        client = GenerateClient([doomed.address], max_attempts=3, backoff_s=0.01)
    with client, pytest.raises(GenerateError, match=f"failed 3 times .*{doomed.address}: UNAVAILABLE"):
        client.complete([[1, 2, 3]], max_new_tokens=4)


# ---------------------------------------------------------------------------- the pure logic


def _conversation(turns: list[tuple[str, str]], line: int) -> Conversation:
    return Conversation([Message(r, c) for r, c in turns], source="chats", line=line)  # type: ignore[arg-type]


def test_regenerate_rewrites_turn_by_turn_in_rounds_and_counts_what_it_skips():
    tokenizer = make_chat_tokenizer()
    calls: list[list[str]] = []

    def complete(prompts: list[list[int]]) -> list[list[int]]:
        calls.append([tokenizer.decode(p) for p in prompts])
        return [tokenizer.encode(f"reply {len(calls)}.{i}") for i in range(len(prompts))]

    long_question = "numbers " * 60
    records = [
        _conversation(MULTI_TURN, 1),
        _conversation(WITH_SYSTEM, 2),
        _conversation([("assistant", "Hi, I am a bot."), ("user", "Hi"), ("assistant", "Hello")], 3),
        TokenizedRow([1, 2, 3], [0, 1, 1], source="tokens", line=4),
        _conversation([("user", long_question), ("assistant", "Too long.")], 5),
        _conversation(
            [("user", "Hi"), ("assistant", "Hello"), ("user", long_question), ("assistant", "x")], 6
        ),
    ]
    result = regenerate_conversations(records, complete=complete, tokenizer=tokenizer, max_prompt_tokens=200)
    out = result.records

    # Round 0: the first turn of 1, 2 and 6 (5's prompt is too long); round 1: 1 only (6 is cut); round 2: 1.
    assert [len(c) for c in calls] == [3, 1, 1]
    assert [m.content for m in out[0].messages if m.role == "assistant"] == [
        "reply 1.0",
        "reply 2.0",
        "reply 3.0",
    ]
    # Turn 2's prompt holds turn 1's regenerated reply, ends with the generation prompt.
    assert "reply 1.0<|im_end|>" in calls[1][0] and "I am doing well" not in calls[1][0]
    assert calls[1][0].endswith("<|im_start|>assistant\n")
    assert out[1].messages[-1] == Message("assistant", "reply 1.1")
    assert out[2] is records[2] and out[3] is records[3]  # kept as they are
    assert isinstance(out[4], RowError) and out[4].kind == "regenerate_too_long" and out[4].line == 5
    assert out[5].messages == [
        Message("user", "Hi"),
        Message("assistant", "reply 1.2"),
    ]  # cut before the long turn
    assert {k: v for k, v in result.counts.as_json().items() if v} == {
        "conversations": 5,
        "regenerated": 2,
        "truncated": 1,
        "too_long": 1,
        "kept_as_is": 1,
        "pretokenized": 1,
        "turns": 5,
        "new_tokens": sum(
            len(tokenizer.encode(f"reply {r}.{i}")) for r, n in ((1, 3), (2, 1), (3, 1)) for i in range(n)
        ),
    }


def test_regenerate_refuses_a_complete_that_loses_replies():
    tokenizer = make_chat_tokenizer()
    with pytest.raises(ValueError, match="1 replies for 2 prompts"):
        regenerate_conversations(
            [_conversation(WITH_SYSTEM, 1), _conversation(WITH_SYSTEM, 2)],
            complete=lambda prompts: [[5]],
            tokenizer=tokenizer,
            max_prompt_tokens=100,
        )


def test_end_of_turn_is_the_templates_closing_token():
    tokenizer = make_chat_tokenizer()
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(IM_END)]
