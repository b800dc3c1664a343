"""Speed of the self-prompt data checks on one CPU core: dedup, text filters, mix statistics.

    python bench/data_checks.py            # 100k texts / rows, plus the templated worst case
    python bench/data_checks.py --quick    # 10k, no worst case

- dedup_*: `Deduplicator.add` (near threshold 0.8) over chitchat's messages (real, short, many exact
  repeats), over random-word texts of 8-80 words (~280 chars, nothing to find), and (--worst) over
  templated prompts that are all at Jaccard ~0.6 to each other, where LSH makes most pairs candidates.
- filters_*: `TextFilter.check` with language="en" over chitchat's messages.
- mix_stats_s: `mix_statistics` over rows of 500 random tokens from three sources.
Rows go to bench/results/data_checks.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rows import emit_rows  # noqa: E402
from dflash_core.data.dedup import Deduplicator  # noqa: E402
from dflash_core.data.formats import TokenizedRow, chitchat_path  # noqa: E402
from dflash_core.data.mix_stats import mix_statistics  # noqa: E402
from dflash_core.data.text_filters import TextFilter, TextFilterConfig  # noqa: E402


def chitchat_messages(count: int) -> list[str]:
    data = json.loads(chitchat_path().read_text(encoding="utf-8"))
    texts = [
        "\n".join(u["text"].strip() for u in run if u["text"].strip())
        for conversation in data.values()
        for run in conversation["messages"]
    ]
    return [t for t in texts if t][:count]


def vocabulary(rng: random.Random) -> list[str]:
    return [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]


def random_texts(count: int, rng: random.Random) -> list[str]:
    words = vocabulary(rng)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 80))) for _ in range(count)]


def templated_texts(count: int, rng: random.Random) -> list[str]:
    words = vocabulary(rng)
    return [
        f"Can you help me write a short {rng.choice(words)} about {rng.choice(words)} {rng.choice(words)}? "
        f"I would like it to be friendly, clear and no longer than {rng.randint(1, 500)} words, please, "
        f"and mention {rng.choice(words)}."
        for _ in range(count)
    ]


def time_dedup(texts: list[str], name: str) -> dict[str, tuple[float, str]]:
    dedup = Deduplicator(near_threshold=0.8)
    start = time.perf_counter()
    for text in texts:
        dedup.add(text)
    seconds = time.perf_counter() - start
    return {
        f"dedup_{name}_s": (seconds, f"s for {len(texts)} texts"),
        f"dedup_{name}_refused": (len(texts) - dedup.counts["kept"], "texts"),
        f"dedup_{name}_false_candidates": (dedup.false_candidates, "candidates"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_checks.json")
    args = parser.parse_args()
    count = 10_000 if args.quick else 100_000
    rng = random.Random(0)
    messages = chitchat_messages(count)
    results = {"chitchat_mean_chars": (float(np.mean([len(t) for t in messages])), "chars")}
    results |= time_dedup(messages, "chitchat")
    results |= time_dedup(random_texts(count, rng), "random")
    if not args.quick:
        results |= time_dedup(templated_texts(count, rng), "templated")

    text_filter = TextFilter(TextFilterConfig(language="en", role_markers=("<|im_start|>", "<|im_end|>")))
    start = time.perf_counter()
    for text in messages:
        text_filter.check(text, token_count=len(text) // 4)
    results["filters_chitchat_s"] = (time.perf_counter() - start, f"s for {len(messages)} texts")
    for reason, dropped in sorted(text_filter.counts.items()):
        results[f"filters_chitchat_{reason}"] = (dropped, "texts")

    generator = np.random.default_rng(0)
    rows = []
    for i in range(count):
        prompt = int(generator.integers(20, 200))
        ids = generator.integers(0, 150_000, 500).tolist()
        rows.append(TokenizedRow(ids, [0] * prompt + [1] * (500 - prompt), ("a", "b", "self")[i % 3], i))
    start = time.perf_counter()
    mix_statistics(rows)
    results["mix_stats_s"] = (time.perf_counter() - start, f"s for {count} rows of 500 tokens")

    config = f"{count} texts/rows, near_threshold 0.8, shingle 5"
    emit_rows(
        results, config=config, device=f"CPU ({platform.processor() or platform.machine()})", out=args.out
    )


if __name__ == "__main__":
    main()
