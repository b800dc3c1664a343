"""bench/quality/categories.py: a `dflash eval` report's figures per prompt category; the prompts file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.quality.categories import CATEGORIES, format_categories, main, tau_by_category

PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "quality" / "prompts.jsonl"


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    rows = [
        {"kind": "code", "prompt": "p1"},
        {"kind": "maths", "prompt": "p2"},
        None,  # a blank line: load_prompts counts it, so line numbers skip it too
        {"kind": "code", "prompt": "p4"},
        {"prompt": "p5"},
        {"kind": "roleplay", "prompt": "p6"},  # never evaluated
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(("" if r is None else json.dumps(r)) + "\n" for r in rows))
    return path


def entry(line: int, drafts: int, accepted: int, positions: list[int] | None = None) -> dict:
    # Reports made on another machine name the file by another folder: only its name counts.
    row = {"source": f"/elsewhere/prompts.jsonl:{line}", "drafts": drafts, "accepted_tokens": accepted}
    return row if positions is None else {**row, "accepted_per_position": positions}


def test_each_category_pools_its_prompts_steps(prompts_file):
    report = {
        "per_prompt": [
            entry(2, 10, 5, [4, 1, 0]),
            entry(1, 2, 4, [2, 1, 1]),  # tau 3.0 on 2 drafts
            entry(4, 18, 0, [0, 0, 0]),  # tau 1.0 on 18 drafts
            entry(5, 0, 0),
        ]
    }
    categories = tau_by_category(report, prompts_file)
    assert list(categories) == ["code", "maths", "(no kind)"]  # the file's order, evaluated ones only
    code = categories["code"]
    assert (code["prompts"], code["drafts"], code["accepted_tokens"]) == (2, 20, 4)
    # 1 + 4/20, not the mean of the prompts' taus (2.0): a 2-draft prompt weighs 2 drafts.
    assert code["tau"] == pytest.approx(1.2)
    assert code["accepted_per_position"] == [2, 1, 1]
    assert code["acceptance_per_position"] == pytest.approx([0.1, 0.05, 0.05])
    assert categories["maths"]["tau"] == pytest.approx(1.5)
    assert categories["maths"]["acceptance_per_position"] == pytest.approx([0.4, 0.1, 0.0])
    assert categories["(no kind)"]["tau"] is None  # no draft, no tau
    assert "acceptance_per_position" not in categories["(no kind)"]


def test_position_rates_need_every_prompt_of_the_category(prompts_file):
    report = {"per_prompt": [entry(1, 4, 2, [2, 0, 0]), entry(4, 4, 1)]}
    code = tau_by_category(report, prompts_file)["code"]
    assert code["tau"] == pytest.approx(1.375)
    assert "acceptance_per_position" not in code


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ({"tau": 1.4, "drafts": 10}, "no per-prompt figures"),
        ({"per_prompt": [entry(3, 1, 0)]}, "is not a row of"),  # the blank line
        ({"per_prompt": [entry(9, 1, 0)]}, "is not a row of"),
        ({"per_prompt": [{"source": "other.jsonl:1", "drafts": 1, "accepted_tokens": 0}]}, "is not a row of"),
        ({"per_prompt": [{"source": "chitchat:1", "drafts": 1, "accepted_tokens": 0}]}, "is not a row of"),
    ],
)
def test_figures_that_cannot_be_mapped_are_refused(prompts_file, report, message):
    with pytest.raises(ValueError, match=message):
        tau_by_category(report, prompts_file)


def test_the_command_prints_a_row_per_category(prompts_file, tmp_path, capsys):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"per_prompt": [entry(1, 4, 2, [2, 0, 0]), entry(2, 5, 0, [0, 0, 0])]}))
    assert main([str(report), "--prompts", str(prompts_file)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_categories(tau_by_category(json.loads(report.read_text()), prompts_file))
    assert "1.500" in out and "0.50 0.00 0.00" in out and "1.000" in out


def test_the_held_out_prompts_cover_every_category_from_the_start():
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    kinds = [row["kind"] for row in rows]
    counts = Counter(kinds)
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 12, counts
    # The first 16 measure tau and the next 8 the live tau: each block holds every category.
    for start, stop in ((0, 8), (8, 16), (16, 24)):
        assert sorted(kinds[start:stop]) == sorted(CATEGORIES)
    texts = []
    for row in rows:
        if row["kind"] == "multi_turn":
            roles = [turn["role"] for turn in row["messages"]]
            assert roles[-1] == "user" and "assistant" in roles, row  # the reply to the last turn is decoded
            texts.append(row["messages"][-1]["content"])
        else:
            assert row["prompt"].strip(), row
            texts.append(row["prompt"])
    assert len(set(texts)) == len(texts)
