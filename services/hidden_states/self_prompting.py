"""`prepare-data --data self`: a `SelfPrompter` writing through the service's Generate or in-process.

The generator is a `GenerateClient` (one or more services) or an `InProcessGenerator`: both
answer `complete(prompts, ...)` with per-prompt seeds, and both report the tokenizer they run,
which must be the one the data is prepared with (else the written ids would mean other text).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from dflash_core.config import PrepareDataConfig
from dflash_core.data.formats import DataError
from dflash_core.data.regenerate import Complete, end_of_turn_ids
from dflash_core.data.self_prompt import SelfPrompter, SelfPromptSettings, end_of_user_turn_ids
from dflash_core.wire.pb import hidden_states_pb2 as pb

__all__ = ["Generator", "check_same_tokenizer", "self_prompter_for", "topics_of"]

# Seeds of the written user turns start here, far from the replies' (config.seed + n): no two
# sampled prompts of a run share one.
_WRITE_SEED_OFFSET = 1 << 40


class Generator(Protocol):
    """What prepare-data needs of a generator: `GenerateClient` or `InProcessGenerator`."""

    info: pb.ServiceInfo

    @property
    def addresses(self) -> list[str]: ...

    @property
    def max_length(self) -> int: ...

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]: ...


def check_same_tokenizer(generator: Generator, *, model: str, tokenizer_fingerprint: str) -> None:
    """Refuse (`DataError`) a generator whose tokenizer or chat template differs from prepare-data's."""
    info = generator.info
    if info.tokenizer_sha256 != tokenizer_fingerprint:
        raise DataError(
            f"the service at {generator.addresses[0]} runs verifier {info.verifier_name_or_path!r} with "
            f"tokenizer/chat template fingerprint {info.tokenizer_sha256[:16]}, but prepare-data uses "
            f"--model {model!r} with fingerprint {tokenizer_fingerprint[:16]}; generate with a "
            "service running the same verifier as --model (or pass the service's model as --model)"
        )


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


def _completer(
    generator: Generator,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    first_seed: int,
    stop_token_ids: Sequence[int],
) -> Complete:
    """A `Complete` on `generator` whose sampled prompts get consecutive seeds across calls."""
    sent = 0

    def complete(prompts: list[list[int]]) -> list[list[int]]:
        nonlocal sent
        seed, sent = first_seed + sent, sent + len(prompts)
        return generator.complete(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )

    return complete


def self_prompter_for(
    generator: Generator, config: PrepareDataConfig, *, tokenizer: Any, tokenizer_fingerprint: str
) -> SelfPrompter:
    """The `SelfPrompter` of `--data self`, after checking the generator serves prepare-data's tokenizer.

    Replies use the regeneration settings (`--regenerate-max-new-tokens`, temperature, top-p).
    Raises `DataError` for settings that cannot work, before anything is generated.
    """
    from dflash_core.data.prompt_checks import prompt_check

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
    )
    user_stop = end_of_user_turn_ids(tokenizer)
    write = _completer(
        generator,
        max_new_tokens=config.self_max_prompt_tokens,
        temperature=config.self_temperature,
        top_p=config.self_top_p,
        first_seed=config.seed + _WRITE_SEED_OFFSET,
        stop_token_ids=user_stop,
    )
    reply = _completer(
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
