"""Exact and near-duplicate removal: what is refused, what is kept, and the same verdicts in any process.

What must hold: exact duplicates are refused through case, width, whitespace and edge punctuation;
a near duplicate is refused at a threshold below its Jaccard and kept above it; a pair whose true
Jaccard is below the threshold is never refused, even when LSH makes it a candidate; hashing does
not depend on PYTHONHASHSEED.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_core.data.dedup import (
    Deduplicator,
    detection_probability,
    jaccard,
    lsh_bands,
    normalize,
    shingles,
)

REPO = Path(__file__).parents[3]

WORDS = [
    *("apple", "river", "stone", "cloud", "garden", "window", "bridge", "silver", "forest", "engine"),
    *("paper", "candle", "market", "winter", "harbor", "pencil", "mirror", "rocket", "violin", "desert"),
    *("orange", "castle", "jacket", "tunnel", "meadow", "planet", "thunder", "copper", "ladder", "island"),
    *("lantern", "marble", "needle", "pillow", "saddle", "timber", "valley", "wagon", "anchor", "basket"),
]

# 300 characters of ordinary prose.
TEXT = (
    "Could you explain how a small town decides where to build a new library, which groups usually "
    "take part in the planning, how long the approvals take, and what a resident can do to make sure "
    "the building has quiet reading rooms, a children's corner, late opening hours and enough "
    "safe, dry bike racks?"
)


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _similarity(a: str, b: str, size: int = 5) -> float:
    return jaccard(shingles(normalize(a), size), shingles(normalize(b), size))


def test_normalize_folds_case_width_whitespace_and_edge_punctuation() -> None:
    assert normalize("  «Hello,\t  WORLD!»\n") == "hello, world"
    assert normalize("Ｈｅｌｌｏ   Ｗｏｒｌｄ") == "hello world"  # NFKC: full-width letters and spaces
    assert normalize("Straße?!") == "strasse"  # casefold, not lower()
    assert normalize("...") == ""


def test_keeps_distinct_texts() -> None:
    rng = random.Random(0)
    texts = [_sentence(rng, 20) for _ in range(200)]
    dedup = Deduplicator()
    assert [dedup.add(t) for t in texts] == [None] * 200
    assert len(dedup) == 200 and dedup.counts == {"kept": 200}


def test_refuses_exact_duplicates_through_case_and_whitespace() -> None:
    dedup = Deduplicator()
    assert dedup.add("How do I bake bread at home?") is None
    assert dedup.add("  how do I   BAKE bread\nat home ") == "exact_duplicate"
    assert dedup.add("«How do I bake bread at home»") == "exact_duplicate"
    assert dedup.add("How do I bake rye bread at home?") is None
    assert dedup.counts == {"kept": 2, "exact_duplicate": 2}


def test_one_word_changed_is_near_duplicate_at_0_8_not_at_0_99() -> None:
    changed = TEXT.replace("library", "museum")
    assert len(TEXT) == 300 and changed != TEXT
    similarity = _similarity(TEXT, changed)
    assert 0.8 <= similarity < 0.99
    strict = Deduplicator(near_threshold=0.8)
    assert strict.add(TEXT) is None
    assert strict.add(changed) == "near_duplicate"
    loose = Deduplicator(near_threshold=0.99)
    assert loose.add(TEXT) is None
    assert loose.add(changed) is None


def _pair(inside: int, *, only_a: int, only_b: int) -> tuple[str, str]:
    """Two texts of distinct characters whose 1-shingle sets share `inside` and differ by the rest."""
    chars = [chr(0x4E00 + i) for i in range(inside + only_a + only_b)]  # CJK: unchanged by normalize
    shared = "".join(chars[:inside])
    return shared + "".join(chars[inside : inside + only_a]), shared + "".join(chars[inside + only_a :])


def test_pair_exactly_at_the_threshold_is_refused_and_just_below_is_kept() -> None:
    at_a, at_b = _pair(800, only_a=100, only_b=100)
    assert _similarity(at_a, at_b, size=1) == 0.8
    dedup = Deduplicator(near_threshold=0.8, shingle=1)
    assert dedup.add(at_a) is None
    assert dedup.add(at_b) == "near_duplicate"

    below_a, below_b = _pair(799, only_a=101, only_b=100)
    assert _similarity(below_a, below_b, size=1) == 799 / 1000
    dedup = Deduplicator(near_threshold=0.8, shingle=1)
    assert dedup.add(below_a) is None
    assert dedup.add(below_b) is None
    # LSH did make it a candidate (a pair at 0.799 almost always is); the exact check refused to refuse.
    assert dedup.false_candidates == 1


def test_prose_pair_just_below_the_threshold_is_kept() -> None:
    rng = random.Random(3)
    words = TEXT.split()
    while True:  # change words until the true Jaccard falls just under 0.8
        words[rng.randrange(len(words))] = rng.choice(WORDS)
        edited = " ".join(words)
        if _similarity(TEXT, edited) < 0.8:
            break
    assert _similarity(TEXT, edited) > 0.75
    dedup = Deduplicator(near_threshold=0.8)
    assert dedup.add(TEXT) is None
    assert dedup.add(edited) is None
    assert dedup.false_candidates == 1


def test_refusals_are_never_false_and_close_pairs_are_found() -> None:
    rng = random.Random(1)
    refused_similarities, missed = [], 0
    for _ in range(150):
        original = _sentence(rng, 40)
        words = original.split()
        for _ in range(rng.randint(0, 12)):
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        edited = " ".join(words)
        dedup = Deduplicator(near_threshold=0.8)
        dedup.add(original)
        verdict = dedup.add(edited)
        similarity = _similarity(original, edited)
        if verdict is not None:
            refused_similarities.append(similarity)
        elif similarity >= 0.85:
            missed += 1  # a pair at 0.85 is found with probability > 0.9999
    assert refused_similarities and min(refused_similarities) >= 0.8
    assert missed == 0


def test_exact_only_and_texts_shorter_than_a_shingle() -> None:
    exact = Deduplicator(near_threshold=None)
    assert exact.add(TEXT) is None
    assert exact.add(TEXT.replace("library", "museum")) is None
    assert exact.add(TEXT.upper()) == "exact_duplicate"
    assert exact.signature(TEXT) is None

    near = Deduplicator(near_threshold=0.5, shingle=5)
    assert near.signature("Hi!") is None  # "hi": shorter than one shingle, exact check only
    assert near.add("Hi!") is None
    assert near.add("hi") == "exact_duplicate"
    assert near.add("ho") is None


def test_band_choice_finds_a_pair_at_the_threshold_with_probability_over_0_99() -> None:
    assert lsh_bands(0.8) == (21, 6)
    assert detection_probability(0.8, bands=21, rows=6) == pytest.approx(0.99831, abs=1e-5)
    for threshold in (0.3, 0.5, 0.7, 0.9, 0.95, 1.0):
        bands, rows = lsh_bands(threshold)
        assert bands * rows <= 128
        assert detection_probability(threshold, bands=bands, rows=rows) >= 0.991
    with pytest.raises(ValueError, match="too low"):
        Deduplicator(near_threshold=0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Deduplicator(near_threshold=1.5)


_VERDICTS_SCRIPT = """
import hashlib, json, random, sys
from dflash_core.data.dedup import Deduplicator
texts = json.loads(sys.stdin.read())
dedup = Deduplicator(near_threshold=0.7, seed=5)
verdicts = [dedup.add(t) for t in texts]
digest = hashlib.sha256(b"".join(dedup.signature(t).tobytes() for t in texts)).hexdigest()
print(json.dumps({"verdicts": verdicts, "digest": digest, "false": dedup.false_candidates}))
"""


def test_same_verdicts_and_signatures_under_any_hash_seed() -> None:
    rng = random.Random(7)
    texts = []
    for _ in range(40):
        words = _sentence(rng, 30).split()
        texts.append(" ".join(words))
        for _ in range(rng.randint(1, 8)):
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        texts.append(" ".join(words))
    results = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", _VERDICTS_SCRIPT],
            input=json.dumps(texts),
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            check=True,
        )
        results.append(json.loads(done.stdout))
    assert results[0] == results[1]
    verdicts = results[0]["verdicts"]
    assert "near_duplicate" in verdicts and None in verdicts  # the texts exercise both outcomes
