"""`dflash demo`'s config: the whole system on the embedded default, small enough for a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from dflash_core.config.base import JobConfig


class DemoConfig(JobConfig):
    """`dflash demo`: the whole system on SmolLM2 and the shipped conversations, on CPU, on 127.0.0.1."""

    output_dir: Path = Field(
        default=Path("output/demo"),
        description="Where data, checkpoints and the control plane's database, log and token go.",
    )
    max_samples: int = Field(
        default=320, gt=0, description="Conversations SmolLM2 writes for training (user turns and replies)."
    )
    seq_length: int = Field(default=512, gt=1, description="Tokens kept per conversation.")
    total_seq_len: int = Field(default=1024, gt=1, description="Tokens per packed training row.")
    block_size: int = Field(default=8, ge=2)
    num_layers: int = Field(
        default=2, gt=0, description="Draft layers (5 for real runs; 2 keeps the demo short)."
    )
    max_anchors: int = Field(default=128, gt=0)
    draft_vocab_size: int | None = Field(
        default=8192,
        gt=0,
        description="Draft vocabulary (the most frequent tokens of the written data); None = SmolLM2's "
        "49152. On a CPU the LM head is most of a step: a smaller one trains more steps in the time.",
    )
    epochs: int = Field(default=8, gt=0, description="Passes over the written data (a few hundred rows).")
    max_steps: int | None = Field(default=None, gt=0, description="Cap on optimizer steps.")
    lr: float = Field(default=2e-3, gt=0)
    seed: int = 0
    hidden_states: Literal["service", "in-process"] = Field(
        default="service",
        description="Where the verifier runs: the gRPC hidden-state service in its own process on "
        "127.0.0.1 (as in production), or inside the trainer (the job names no endpoint).",
    )
    port: int | None = Field(
        default=None, ge=1, lt=65536, description="Control plane HTTP port on 127.0.0.1; default: a free one."
    )
    eval_num_prompts: int = Field(
        default=8,
        ge=0,
        description="Held-out prompts (the validation rows) for the final `dflash eval` of checkpoint_best; "
        "0 skips it.",
    )
    eval_max_new_tokens: int = Field(default=32, gt=0, description="New tokens per final-eval prompt.")
