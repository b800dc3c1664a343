"""Small synthetic chat datasets written on the fly, in the `messages` JSONL format prepare-data reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "ran",
    "to",
    "see",
    "one",
    "two",
    "three",
    "four",
    "five",
    "blue",
    "red",
    "green",
]


def write_chats(path: Path, *, count: int, seed: int = 0) -> Path:
    """Conversations whose answers walk a fixed word cycle: structure a drafter can pick up."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            answer = " ".join(WORDS[(j + i) % len(WORDS)] for j in range(rng.randint(10, 30)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
