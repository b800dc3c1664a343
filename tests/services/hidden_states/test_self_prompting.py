"""`prepare-data --data self` end to end: the verifier writes conversations, via a service or in-process.

What must hold: the service's Generate and the in-process verifier give the same rows; a fixed seed
gives identical data and another seed other data; every row parses back as system, then user and
assistant turns in alternation, with only the replies supervised; mixing with another source keeps
every self-written row and fills the rest; the metadata records the mix and the refusals; a
service running another tokenizer, and settings that cannot work, are refused before generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dflash_core.data.prepare import load_prepared
from services.cli.main import main
from services.hidden_states.server import HiddenStateServer
from tests.factories.chats import write_chats
from tests.factories.services import running_service
from tests.factories.tokenizers import IM_END, IM_START
from tests.factories.verifiers import make_tiny_verifier, make_turn_ending_verifier

SAMPLES = 6


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory):
    return make_turn_ending_verifier(tmp_path_factory.mktemp("verifier"))


@pytest.fixture(scope="module")
def server(verifier) -> Iterator[HiddenStateServer]:
    # bfloat16: what `prepare-data` loads in-process (the service's `--dtype auto`).
    with running_service(verifier.path, target_layer_ids=[1], dtype="bfloat16") as server:
        yield server


def prepare(verifier, output: Path, *extra: str, data: tuple[str, ...] = ("self",)) -> dict:
    argv = [
        "prepare-data",
        "--model",
        str(verifier.path),
        "--data",
        *data,
        "--output",
        str(output),
        "--self-samples",
        str(SAMPLES),
        "--self-turns",
        "2",
        "--self-max-prompt-tokens",
        "32",
        "--self-min-prompt-tokens",
        "1",
        "--regenerate-max-new-tokens",
        "16",
        "--seq-length",
        "512",
        *extra,
    ]
    assert main(argv) == 0
    dataset, metadata = load_prepared(output)
    return {"rows": [dict(r) for r in dataset], "metadata": metadata.model_dump(mode="json")}


@pytest.fixture(scope="module")
def in_process(verifier, tmp_path_factory) -> dict:
    return prepare(verifier, tmp_path_factory.mktemp("in-process") / "data")


def test_service_and_in_process_give_the_same_rows(verifier, server, in_process, tmp_path) -> None:
    served = prepare(verifier, tmp_path / "data", "--regenerate-with", f"127.0.0.1:{server.port}")
    assert served["rows"] == in_process["rows"]
    assert served["metadata"]["self_prompted"]["counts"] == in_process["metadata"]["self_prompted"]["counts"]
    assert served["metadata"]["self_prompted"]["generator"]["endpoints"] == [f"127.0.0.1:{server.port}"]
    assert in_process["metadata"]["self_prompted"]["generator"]["endpoints"] == ["in-process"]


def test_a_seed_fixes_the_data(verifier, in_process, tmp_path) -> None:
    again = prepare(verifier, tmp_path / "again")
    assert again["rows"] == in_process["rows"]
    other = prepare(verifier, tmp_path / "other", "--seed", "1")
    assert other["rows"] != in_process["rows"]


def test_rows_parse_back_as_alternating_user_and_assistant_turns(verifier, in_process) -> None:
    tokenizer = verifier.tokenizer
    start, end = tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)
    rows = in_process["rows"]
    assert len(rows) == SAMPLES and all(r["source"] == "self" for r in rows)
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        turns = [i for i, t in enumerate(ids) if t == start]
        roles = [tokenizer.decode(ids[i + 1 : ids.index(end, i)]).split("\n")[0] for i in turns]
        assert roles[0] == "system" and len(roles) in (3, 5)
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2)
        # Supervised tokens lie only inside assistant turns (their content and closing <|im_end|>).
        for turn, role in zip(turns, roles, strict=True):
            close = ids.index(end, turn)
            inside = mask[turn : close + 1]
            assert any(inside) if role == "assistant" else not any(inside)
    counts = in_process["metadata"]["self_prompted"]["counts"]
    assert counts["kept"] == SAMPLES and counts["started"] >= SAMPLES
    # The random verifier also samples <|im_start|>, <|endoftext|> and runs past 32 tokens:
    # refused and counted, never kept.
    assert set(counts["refused"]) <= {
        "special_token",
        "unfinished",
        "empty",
        "role_marker",
        "exact_duplicate",
        "near_duplicate",
        "degenerate",
    }


def test_mixed_with_another_source_keeps_every_self_row(verifier, tmp_path) -> None:
    chats = write_chats(tmp_path / "chats.jsonl", count=20, seed=3)
    mixed = prepare(verifier, tmp_path / "mixed", "--max-samples", "10", data=("self", str(chats)))
    sources = [r["source"] for r in mixed["rows"]]
    assert sources.count("self") == SAMPLES and sources.count(str(chats)) == 10 - SAMPLES
    assert sources[:SAMPLES] != ["self"] * SAMPLES  # shuffled together
    report = {s["spec"]: s for s in mixed["metadata"]["sources"]}
    assert report["self"]["rows_written"] == SAMPLES and report[str(chats)]["rows_written"] == 10 - SAMPLES


def test_a_service_with_another_tokenizer_is_refused(tmp_path, capsys) -> None:
    other = make_tiny_verifier(tmp_path / "other", vocab_size=None, seed=5)
    from tests.factories.tokenizers import make_chat_tokenizer

    tokenizer = make_chat_tokenizer(system_prompt="Another default system prompt.")
    mine = make_tiny_verifier(tmp_path / "mine", tokenizer=tokenizer)
    with running_service(other.path, target_layer_ids=[1]) as server:
        code = main(
            [
                "prepare-data",
                "--model",
                str(mine.path),
                "--data",
                "self",
                "--self-samples",
                "2",
                "--output",
                str(tmp_path / "out"),
                "--regenerate-with",
                f"127.0.0.1:{server.port}",
            ]
        )
    assert code == 2
    assert "fingerprint" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_bad_settings_fail_before_generation(verifier, tmp_path, capsys) -> None:
    base = ["prepare-data", "--model", str(verifier.path), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--self-samples"):
        main([*base, "--data", "self"])  # no count
    topics = tmp_path / "topics.txt"
    topics.write_text("# nothing but a comment\n\n")
    assert main([*base, "--data", "self", "--self-samples", "2", "--self-topics", str(topics)]) == 2
    assert "lists no topic" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_metadata_records_the_settings(in_process) -> None:
    meta = in_process["metadata"]["self_prompted"]
    assert meta["turns"] == 2 and meta["samples"] == SAMPLES
    assert meta["params"]["temperature"] == 1.0 and meta["params"]["stop_token_ids"] == [2]
    assert meta["filters"]["dedup"] == "near"
    json.dumps(meta)  # serialisable as written


def test_metadata_records_the_mix(verifier, tmp_path) -> None:
    chats = write_chats(tmp_path / "chats.jsonl", count=20, seed=3)
    mixed = prepare(verifier, tmp_path / "mixed", "--max-samples", "10", data=("self", str(chats)))
    mix = mixed["metadata"]["mix"]
    assert mix["sources"]["self"]["rows"] == SAMPLES and mix["sources"][str(chats)]["rows"] == 10 - SAMPLES
    assert mix["overall"]["rows"] == 10
    assert 0 < mix["sources"]["self"]["distinct_prompt_ratio"] <= 1


def test_in_process_regeneration_of_another_source(verifier, tmp_path) -> None:
    chats = write_chats(tmp_path / "chats.jsonl", count=4, seed=3)
    mixed = prepare(
        verifier, tmp_path / "mixed", "--regenerate-with", "in-process", data=("self", str(chats))
    )
    regenerated = mixed["metadata"]["regenerated"]
    assert regenerated["service"]["endpoints"] == ["in-process"]
    assert regenerated["counts"]["regenerated"] + regenerated["counts"]["truncated"] >= 1
    assert {r["source"] for r in mixed["rows"]} == {"self", str(chats)}
