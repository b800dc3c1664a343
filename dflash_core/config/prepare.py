"""`dflash prepare-data`'s config: the sources, the regeneration of replies, self-written prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dflash_core.config.base import EMBEDDED_DATA, EMBEDDED_VERIFIER, IN_PROCESS, SELF_DATA, JobConfig


class Sources(JobConfig):
    """what to tokenize, and how"""

    model: str = Field(
        default=EMBEDDED_VERIFIER,
        description="Verifier whose tokenizer and chat template are applied (HF id, local path, or "
        f"`{EMBEDDED_VERIFIER}`).",
    )
    data: list[str] = Field(
        default_factory=lambda: [EMBEDDED_DATA],
        description="Sources: `sharegpt`, `ultrachat`, `chitchat`, or paths to .json/.jsonl files "
        "(ShareGPT `from/value`, `role/content` messages, or pre-tokenized `input_ids`+`loss_mask`).",
    )
    output: Path = Field(description="Directory for the tokenized dataset (arrow) and token_freq.pt.")
    max_samples: int | None = Field(default=None, gt=0, description="Keep at most this many rows.")
    seq_length: int = Field(default=8192, gt=1, description="Truncate each conversation to this many tokens.")
    min_supervised_tokens: int = Field(
        default=1, ge=1, description="Drop rows with fewer assistant (loss) tokens than this."
    )
    assistant_only_loss: bool = Field(
        default=True, description="Supervise assistant turns only; false supervises every token."
    )
    seed: int = Field(default=0, description="Seed for the row shuffle.")
    num_proc: int = Field(default=1, ge=1, description="Tokenizer worker processes.")


class Regeneration(JobConfig):
    """the verifier rewrites the replies (on-policy data)"""

    regenerate_with: list[str] | None = Field(
        default=None,
        description="Hidden-state service endpoints (or `in-process`: the verifier runs in this "
        "process): rewrite every assistant turn with the verifier's own completion (on-policy "
        "data) before tokenizing. `--data self` generates through them too.",
    )
    regenerate_max_new_tokens: int = Field(
        default=1024, gt=0, description="Longest regenerated assistant turn, in tokens."
    )
    regenerate_temperature: float = Field(
        default=0.0, ge=0, description="Sampling temperature of the regeneration; 0 = greedy."
    )
    regenerate_top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling cut-off.")

    @model_validator(mode="after")
    def _one_kind_of_generator(self) -> Regeneration:
        if self.regenerate_with and IN_PROCESS in self.regenerate_with and len(self.regenerate_with) > 1:
            raise ValueError("--regenerate-with takes service endpoints or `in-process`, not both")
        return self


class SelfPrompting(JobConfig):
    """`--data self`: the verifier writes the user turns (Magpie), then answers them"""

    self_samples: int | None = Field(
        default=None,
        gt=0,
        description="Conversations `--data self` writes (default: --max-samples). All are kept; other "
        "sources fill the rest of --max-samples.",
    )
    self_turns: int = Field(default=1, ge=1, description="User turns per self-written conversation.")
    self_temperature: float = Field(
        default=1.0, gt=0, description="Sampling temperature of the user turns the verifier writes."
    )
    self_top_p: float = Field(
        default=1.0, gt=0, le=1, description="Nucleus cut-off of the written user turns."
    )
    self_max_prompt_tokens: int = Field(
        default=256, gt=0, description="Longest user turn written; a longer one is dropped as unfinished."
    )
    self_min_prompt_tokens: int = Field(
        default=3, ge=1, description="Drop written user turns shorter than this."
    )
    self_system_prompt: str | None = Field(
        default=None, description="System message of every self-written conversation (kept in the data)."
    )
    self_topics: list[str] | None = Field(
        default=None,
        description="Steer the written user turns, one topic per conversation in turn (a .txt file of one "
        "topic a line, or the topics themselves); shown to the writer only, never kept.",
    )
    self_language: str | None = Field(
        default=None, description="Keep written user turns in this language only (ISO 639-1, e.g. `en`)."
    )
    self_dedup: Literal["near", "exact", "none"] = Field(
        default="near", description="Drop written user turns that repeat an earlier one: near-duplicates too."
    )
    self_near_duplicate: float = Field(
        default=0.8,
        ge=0.1,  # lower would call most texts of one language duplicates of each other
        le=1,
        description="Character 5-gram Jaccard similarity at which a user turn is a near-duplicate.",
    )

    @model_validator(mode="after")
    def _prompt_lengths(self) -> SelfPrompting:
        if self.self_max_prompt_tokens <= self.self_min_prompt_tokens:
            raise ValueError(
                f"--self-max-prompt-tokens {self.self_max_prompt_tokens} must exceed "
                f"--self-min-prompt-tokens {self.self_min_prompt_tokens}"
            )
        return self


class PrepareDataConfig(Sources, Regeneration, SelfPrompting):
    """`dflash prepare-data`: tokenize conversations with the verifier's chat template."""

    @model_validator(mode="after")
    def _self_count_given(self) -> PrepareDataConfig:
        if SELF_DATA in self.data and self.self_samples is None and self.max_samples is None:
            raise ValueError("--data self needs a count: pass --self-samples N (or --max-samples N)")
        return self

    @property
    def self_count(self) -> int:
        """Conversations `--data self` writes."""
        count = self.self_samples if self.self_samples is not None else self.max_samples
        assert count is not None  # the validator above
        return count
