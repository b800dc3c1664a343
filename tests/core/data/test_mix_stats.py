"""Statistics of a data mix on rows small enough to count by hand, per source and overall.

What must hold: a prompt ends at the first supervised token; 4-grams never cross a row, a prompt's
end or a gap between supervised runs; bins include their lower edge; the result is plain JSON and
does not depend on row order or on how rows are chunked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from dflash_core.data import mix_stats
from dflash_core.data.formats import TokenizedRow
from dflash_core.data.mix_stats import LENGTH_BINS, mix_statistics


def _row(prompt: list[int], reply: Sequence[int | None] = (), source: str = "a") -> TokenizedRow:
    """`reply` tokens are supervised; None in it stands for an unsupervised token id 99 (a user turn)."""
    ids = prompt + [99 if t is None else t for t in reply]
    mask = [0] * len(prompt) + [0 if t is None else 1 for t in reply]
    return TokenizedRow(input_ids=ids, loss_mask=mask, source=source, line=None)


def _hand_rows() -> list[TokenizedRow]:
    return [
        # a: the same 5-token prompt twice; replies of 3 and 5 tokens.
        _row([1, 2, 3, 4, 5], [6, 7, 8], source="a"),
        _row([1, 2, 3, 4, 5], [9, 9, 9, 9, 9], source="a"),
        # b: a two-turn row (supervised runs of 5 and 4 around two user tokens), a row without any
        # supervised token (all prompt), and a row with a 20-token prompt and a 16-token reply.
        _row([1, 2, 3, 4], [10, 11, 12, 13, 14, None, None, 15, 16, 17, 18], source="b"),
        _row([5, 6, 7], [], source="b"),
        _row(list(range(100, 120)), list(range(200, 216)), source="b"),
    ]


def _histogram(counts: dict[str, int]) -> dict[str, int]:
    return {label: counts.get(label, 0) for label in LENGTH_BINS}


def test_hand_counted_example() -> None:
    stats = mix_statistics(_hand_rows())
    assert stats["ngram"] == 4 and stats["length_bins"] == list(LENGTH_BINS)
    a, b, overall = stats["sources"]["a"], stats["sources"]["b"], stats["overall"]
    assert list(stats["sources"]) == ["a", "b"]

    assert a == {
        "rows": 2,
        "share": 0.4,
        "distinct_prompt_ratio": 0.5,  # one prompt, twice
        # Prompt 4-grams (1,2,3,4), (2,3,4,5) in each row; reply: (9,9,9,9) twice, none in 3 tokens.
        "distinct_4gram_ratio": {"prompt": 2 / 4, "reply": 1 / 2},
        "prompt_tokens": {"mean": 5.0, "median": 5.0, "histogram": _histogram({"0-15": 2})},
        "reply_tokens": {"mean": 4.0, "median": 4.0, "histogram": _histogram({"0-15": 2})},
    }
    assert b == {
        "rows": 3,
        "share": 0.6,
        "distinct_prompt_ratio": 1.0,
        # Prompts: 1 + 0 + 17 4-grams. Replies: 2 + 1 (not across the user turn) + 13.
        "distinct_4gram_ratio": {"prompt": 18 / 18, "reply": 16 / 16},
        "prompt_tokens": {"mean": 9.0, "median": 4.0, "histogram": _histogram({"0-15": 2, "16-31": 1})},
        "reply_tokens": {"mean": 25 / 3, "median": 9.0, "histogram": _histogram({"0-15": 2, "16-31": 1})},
    }
    assert overall == {
        "rows": 5,
        "share": 1.0,
        "distinct_prompt_ratio": 4 / 5,
        # (1,2,3,4) is in both sources' prompts: 2 + 18 - 1 distinct of 22.
        "distinct_4gram_ratio": {"prompt": 19 / 22, "reply": 17 / 18},
        "prompt_tokens": {"mean": 7.4, "median": 5.0, "histogram": _histogram({"0-15": 4, "16-31": 1})},
        "reply_tokens": {"mean": 6.6, "median": 5.0, "histogram": _histogram({"0-15": 4, "16-31": 1})},
    }


def test_bins_include_their_lower_edge() -> None:
    assert LENGTH_BINS[:3] == ("0-15", "16-31", "32-63") and LENGTH_BINS[-2:] == ("4096-8191", "8192+")
    rows = [_row([7] * n, [8]) for n in (0, 15, 16, 8191, 8192, 20000)]
    histogram = mix_statistics(rows)["overall"]["prompt_tokens"]["histogram"]
    assert histogram == _histogram({"0-15": 2, "16-31": 1, "4096-8191": 1, "8192+": 2})


def test_json_ready_and_independent_of_row_order_and_chunking(monkeypatch) -> None:
    rng = random.Random(0)
    rows = [
        _row(
            [rng.randrange(50) for _ in range(rng.randint(0, 40))],
            [rng.choice([None, *range(30)]) for _ in range(rng.randint(0, 60))],
            source=rng.choice(["chitchat", "self", "sharegpt"]),
        )
        for _ in range(300)
    ]
    stats = mix_statistics(rows)
    assert json.loads(json.dumps(stats)) == stats
    shuffled = rows[:]
    rng.shuffle(shuffled)
    assert mix_statistics(shuffled) == stats
    monkeypatch.setattr(mix_stats, "_CHUNK_TOKENS", 50)  # many chunks per source
    assert mix_statistics(rows) == stats
    assert sum(s["rows"] for s in stats["sources"].values()) == 300


def test_no_rows() -> None:
    stats = mix_statistics([])
    assert stats["sources"] == {}
    assert stats["overall"]["rows"] == 0 and stats["overall"]["share"] is None
    assert stats["overall"]["distinct_4gram_ratio"] == {"prompt": None, "reply": None}
    assert stats["overall"]["prompt_tokens"]["mean"] is None
