"""`prepare-data --data self`: a `SelfPrompter` writing through the service's Generate or in-process.

The generator is a `GenerateClient` (one or more services) or an `InProcessGenerator`
(`generate_client.Generator`); it must run the tokenizer the data is prepared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dflash_core.config import PrepareDataConfig
from dflash_core.data.formats import DataError
from dflash_core.data.prompt_checks import prompt_check
from dflash_core.data.regenerate import end_of_turn_ids
from dflash_core.data.self_prompt import SelfPrompter, SelfPromptSettings, end_of_user_turn_ids
from services.hidden_states.generate_client import Generator, check_same_tokenizer, seeded_complete

__all__ = ["self_prompter_for", "topics_of"]

# Seeds of the written user turns start here, far from the replies' (config.seed + n): no two
# sampled prompts of a run share one.
_WRITE_SEED_OFFSET = 1 << 40


def topics_of(entries: Sequence[str] | None) -> tuple[str, ...]:
    """`--self-topics`: one `.txt` file (a topic a line; blank and `#` lines skipped) or the topics."""
    if not entries:
        return ()
    if len(entries) == 1 and entries[0].endswith(".txt"):
        path = Path(entries[0])
        if not path.is_file():
            raise DataError(f"--self-topics {path}: no such file")
        topics = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        topics = [t for t in topics if t and not t.startswith("#")]
        if not topics:
            raise DataError(f"--self-topics {path} lists no topic")
        return tuple(topics)
    return tuple(e.strip() for e in entries if e.strip())


def self_prompter_for(
    generator: Generator, config: PrepareDataConfig, *, tokenizer: Any, tokenizer_fingerprint: str
) -> SelfPrompter:
    """The `SelfPrompter` of `--data self`, after checking the generator serves prepare-data's tokenizer.

    Replies use the regeneration settings (`--regenerate-max-new-tokens`, temperature, top-p).
    Raises `GenerateError` (another tokenizer) or `DataError` (settings that cannot work) before
    anything is generated.
    """
    check_same_tokenizer(generator, model=config.model, tokenizer_fingerprint=tokenizer_fingerprint)
    reply_tokens = config.regenerate_max_new_tokens
    max_context = min(generator.max_length - reply_tokens, config.seq_length - 1)
    if max_context <= config.self_max_prompt_tokens:
        raise DataError(
            f"--regenerate-max-new-tokens {reply_tokens} leaves {max_context} tokens of context under the "
            f"generator's max length {generator.max_length} and --seq-length {config.seq_length}: not "
            f"enough for a user turn of --self-max-prompt-tokens {config.self_max_prompt_tokens}"
        )
    settings = SelfPromptSettings(
        samples=config.self_count,
        turns=config.self_turns,
        max_prompt_tokens=config.self_max_prompt_tokens,
        max_context_tokens=max_context,
        system_prompt=config.self_system_prompt,
        topics=topics_of(config.self_topics),
        # As for regeneration: every call in flight twice over per round, so that engines side by
        # side (--engine-replicas) all stay full until the round's tail.
        round_size=max(SelfPromptSettings.round_size, 2 * generator.batch_size * generator.calls_in_flight),
    )
    user_stop = end_of_user_turn_ids(tokenizer)
    write = seeded_complete(
        generator,
        max_new_tokens=config.self_max_prompt_tokens,
        temperature=config.self_temperature,
        top_p=config.self_top_p,
        first_seed=config.seed + _WRITE_SEED_OFFSET,
        stop_token_ids=user_stop,
    )
    reply = seeded_complete(
        generator,
        max_new_tokens=reply_tokens,
        temperature=config.regenerate_temperature,
        top_p=config.regenerate_top_p,
        first_seed=config.seed,
        stop_token_ids=end_of_turn_ids(tokenizer),
    )
    return SelfPrompter(
        tokenizer=tokenizer,
        write=write,
        reply=reply,
        settings=settings,
        check_prompt=prompt_check(config),
        description={
            "generator": {
                "endpoints": generator.addresses,
                "verifier_name_or_path": generator.info.verifier_name_or_path,
                "backend": generator.info.backend,
            },
            "params": {
                "temperature": config.self_temperature,
                "top_p": config.self_top_p,
                "reply_max_new_tokens": reply_tokens,
                "reply_temperature": config.regenerate_temperature,
                "seed": config.seed,
                "stop_token_ids": user_stop,
            },
            "filters": {
                "min_prompt_tokens": config.self_min_prompt_tokens,
                "language": config.self_language,
                "dedup": config.self_dedup,
                "near_duplicate": config.self_near_duplicate if config.self_dedup == "near" else None,
            },
        },
    )
