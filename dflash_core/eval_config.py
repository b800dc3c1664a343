"""Typed configs of `dflash eval` and `dflash export` (CLI flags and `--help` are generated from them).

Kept apart from `dflash_core.config` (the training-side job configs); same conventions: one
docstring per field, every default written once, cross-field errors name the flag to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dflash_core.config import EMBEDDED_DATA, JobConfig


class EvalConfig(JobConfig):
    """`dflash eval`: acceptance length (tau) and speed of a drafter by real speculative decoding."""

    checkpoint: Path = Field(
        description="Drafter checkpoint folder (config.json + model.safetensors): ours, or the z-lab layout "
        "(`dflash export --format zlab`; its layer ids are converted)."
    )
    verifier: str | None = Field(
        default=None,
        description="Verifier to decode with (HF id, local folder or `embedded:smollm2-135m-instruct`); "
        "default: the one the checkpoint's config.json names. Refused when it does not match the drafter.",
    )
    prompts: str = Field(
        default=EMBEDDED_DATA,
        description="`chitchat` (the shipped conversations), a `dflash prepare-data` folder (each row up to "
        "its first assistant turn), or a .json/.jsonl file of chats (`messages`/`conversations`), "
        '`{"prompt": text}` rows or pre-tokenized rows (`input_ids` + `loss_mask`).',
    )
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="`transformers`: our speculative decoding loop (batch 1); `vllm`: vLLM's DFlash "
        "speculative decoding, run under $DFLASH_VLLM_PYTHON, acceptance read from vLLM's counters.",
    )
    max_new_tokens: int = Field(default=128, gt=0, description="New tokens per prompt.")
    temperature: float = Field(
        default=0.0, ge=0, description="0 = greedy (lossless); > 0 = speculative rejection sampling."
    )
    num_prompts: int = Field(default=16, gt=0, description="Prompts taken from --prompts, in order.")
    device: str = Field(default="auto", description="transformers engine: `auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Dtype of verifier and drafter. transformers engine: auto = float32 on CPU, bfloat16 on "
        "CUDA; vllm engine: auto = vLLM's choice. In float32 both engines count the same drafts (a test "
        "checks it); in bfloat16 near-ties round differently in a block forward and a one-token forward.",
    )
    baseline: bool = Field(
        default=True,
        description="Also run the verifier alone (its own generate) for tokens/s without drafter.",
    )
    seed: int = Field(default=0, description="Sampling seed (temperature > 0).")
    output_json: Path | None = Field(default=None, description="Also write the report here as JSON.")
    vllm_max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="vllm engine: max_model_len; default: longest prompt + --max-new-tokens + block size.",
    )


class ExportConfig(JobConfig):
    """`dflash export`: write a drafter checkpoint in another layout (or import one into ours)."""

    checkpoint: Path = Field(
        description="Source checkpoint folder: ours (speculators layout) or a z-lab DFlash checkpoint."
    )
    format: Literal["zlab", "speculators"] = Field(
        default="zlab",
        description="`zlab`: the z-lab / SGLang DFlash layout (layer ids shifted by one); `speculators`: our "
        "default layout (a plain copy of ours, or an import of a z-lab checkpoint).",
    )
    output: Path = Field(description="Folder to write (must not exist, unless --overwrite).")
    verifier: str | None = Field(
        default=None,
        description="The verifier (HF id, folder, embedded): needed to import a z-lab checkpoint that does "
        "not name it, and read for `num_target_layers` when exporting to z-lab.",
    )
    overwrite: bool = Field(default=False, description="Replace an existing --output folder.")

    @model_validator(mode="after")
    def _distinct(self) -> ExportConfig:
        if self.output.resolve() == self.checkpoint.resolve():
            raise ValueError("--output must differ from the source checkpoint folder")
        return self
