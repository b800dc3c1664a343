"""`dflash train`'s config, in sections: each section is a class with its own fields and rules.

The sections only group the code and `--help`; a TrainConfig is one flat model (YAML keys and
flags are the field names), so the tutorial's commands and files work as written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dflash_core.config.base import EMBEDDED_VERIFIER, JobConfig, LayerIds
from dflash_core.config.hidden_state_transfer import HiddenStateTransfer


class TrainTarget(JobConfig):
    """what to train against, where to write, where to start from"""

    verifier_name_or_path: str = Field(
        default=EMBEDDED_VERIFIER, description="The verifier (target) model: HF id, local path or embedded."
    )
    data_path: Path = Field(description="Output folder of `dflash prepare-data`.")
    save_path: Path = Field(
        description="Checkpoint root: epoch folders 0/ 1/ ... plus checkpoint_best, latest."
    )
    speculator_type: Literal["dflash"] = Field(default="dflash", description="Only DFlash is trained here.")
    from_pretrained: Path | None = Field(
        default=None, description="Start from these drafter weights (fresh optimizer and schedule)."
    )
    resume: bool = Field(
        default=True, description="Continue from save_path/latest when it exists (exact resume)."
    )


class DrafterShape(JobConfig):
    """drafter architecture"""

    block_size: int = Field(default=8, ge=2, description="Tokens per block (anchor + block_size-1 drafts).")
    max_anchors: int = Field(default=512, gt=0, description="Anchors (blocks) sampled per packed row.")
    num_layers: int = Field(default=5, gt=0, description="Draft decoder layers.")
    draft_vocab_size: int | None = Field(
        default=None, gt=0, description="Reduced draft vocabulary (most frequent target tokens); None = full."
    )
    target_layer_ids: LayerIds | None = Field(
        default=None,
        description="Verifier layer ids fed to the drafter (id L = residual entering layer L; N = last "
        "layer output before the final norm). Default: 3 ids spread over the verifier.",
    )
    mask_token_id: int | None = Field(
        default=None, description="Block filler token; default: tokenizer mask token, else an unused id."
    )
    full_attention: bool = Field(
        default=True,
        description="Bidirectional attention inside a block (DFlash); false = causal sliding layers.",
    )
    sliding_window: int | None = Field(
        default=None,
        gt=0,
        description="Context rows visible to sliding layers (only with --no-full-attention).",
    )

    @model_validator(mode="after")
    def _attention_layout(self) -> DrafterShape:
        if self.sliding_window is not None and self.full_attention:
            raise ValueError("--sliding-window needs --no-full-attention (sliding layers)")
        if not self.full_attention and self.sliding_window is None:
            raise ValueError("--no-full-attention needs --sliding-window N")
        return self


class Optimisation(JobConfig):
    """optimisation: schedule, batch, loss"""

    epochs: int = Field(default=5, gt=0)
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor as a fraction of --lr.")
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0, description="Clip the global grad norm to this.")
    total_seq_len: int = Field(default=8192, gt=1, description="Tokens per packed row (samples are packed).")
    batch_size: int = Field(default=1, gt=0, description="Packed rows per optimizer step (per rank).")
    loss: Literal["ce", "kl"] = Field(default="ce", description="Hard-label CE or KL to the verifier.")
    loss_weighting: Literal["exp_decay", "dpace", "uniform"] = Field(
        default="exp_decay", description="Per-slot weights: exp(-(k-1)/gamma), D-PACE, or all ones."
    )
    gamma: float | None = Field(
        default=None, gt=0, description="Decay for exp_decay; default 7 for block 16, 4 for block 8."
    )
    dpace_alpha: float = Field(default=0.5, ge=0, le=1)
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps.")
    seed: int = Field(default=0)


class Evaluation(JobConfig):
    """validation, live acceptance, checkpoints"""

    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of rows held out for val/.")
    checkpoint_freq: int | None = Field(
        default=None, gt=0, description="Also checkpoint every N steps (epoch ends always checkpoint)."
    )
    log_freq: int = Field(default=10, gt=0, description="Steps between metric log lines.")
    save_best: bool = Field(
        default=True,
        description="Maintain the checkpoint_best link: the epoch with the best --best-metric.",
    )
    best_metric: Literal["val_loss", "tau"] = Field(
        default="val_loss",
        description="What picks checkpoint_best: `val_loss` (the lowest validation loss) or `tau` (the "
        "highest live acceptance length at an epoch's end; needs --eval-every).",
    )
    eval_every: int | None = Field(
        default=None,
        ge=0,
        description="Live acceptance every N optimizer steps, at each epoch end and before the first step: "
        "tau of greedy speculative decoding on held-out prompts, as `dflash eval` counts it (`eval/tau`, "
        "`eval/accept_rate_pos{k}`). None or 0 = off.",
    )
    eval_prompts: str | None = Field(
        default=None,
        description="Live-acceptance prompts: `chitchat`, a prepare-data folder or a .json/.jsonl file (as "
        "`dflash eval --prompts`); default: the validation rows of --data-path, cut before their reply.",
    )
    eval_num_prompts: int = Field(default=16, gt=0, description="Live-acceptance prompts (the first N).")
    eval_max_new_tokens: int = Field(
        default=64, ge=2, description="Tokens decoded per live-acceptance prompt (as `dflash eval`)."
    )

    @model_validator(mode="after")
    def _live_acceptance(self) -> Evaluation:
        if self.best_metric == "tau" and not self.eval_every:
            raise ValueError(
                "--best-metric tau needs live acceptance: pass --eval-every N (steps), or keep "
                "--best-metric val_loss"
            )
        if self.eval_every and self.eval_prompts is None and self.val_fraction == 0:
            raise ValueError(
                "--eval-every takes its prompts from the validation rows by default, but --val-fraction "
                "is 0: pass --eval-prompts SOURCE (chitchat, a prepare-data folder, a .jsonl file) or a "
                "--val-fraction above 0"
            )
        return self


class Reporting(JobConfig):
    """metric sinks and the control plane"""

    report_to: list[Literal["jsonl", "tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Metric sinks besides the log, on rank 0: `jsonl` (`<save-path>/metrics.jsonl`), "
        "`tensorboard` (`<save-path>/tensorboard`), `wandb`, `trackio`, `mlflow` (need their packages).",
    )
    run_name: str | None = Field(
        default=None, description="Run name in wandb, trackio and mlflow; default: --job-id, else theirs."
    )
    control_plane_url: str | None = Field(
        default=None,
        description="Also POST metric rows to `<url>/v1/jobs/<job-id>/metrics` (needs --job-id); bearer "
        "token from --control-plane-token-file, else `$DFLASH_CONTROL_PLANE_TOKEN`.",
    )
    job_id: str | None = Field(default=None, description="This run's job id at the control plane.")
    control_plane_token_file: Path | None = Field(
        default=None, description="File holding the control plane's bearer token (never logged)."
    )

    @model_validator(mode="after")
    def _control_plane_pair(self) -> Reporting:
        if (self.control_plane_url is None) != (self.job_id is None):
            given, missing = (
                ("--control-plane-url", "--job-id")
                if self.job_id is None
                else ("--job-id", "--control-plane-url")
            )
            raise ValueError(f"{given} needs {missing} too (metrics go to <url>/v1/jobs/<job-id>/metrics)")
        return self


class HiddenStateSource(HiddenStateTransfer):
    """hidden states: computed in-process or pulled from services, cached or not"""

    on_missing: Literal["generate", "skip", "warn", "raise"] = Field(
        default="generate", description="A sample without cached hidden states: compute it, skip, or fail."
    )
    on_generate: Literal["delete", "cache"] = Field(
        default="delete", description="Drop computed hidden states after use, or keep them in the cache."
    )
    hidden_states_endpoint: list[str] | None = Field(
        default=None,
        description="Hidden-state service addresses (`host:port`, `http://host:port/v1` also accepted); "
        "several spread the load and survive one dying. None = compute in-process.",
    )
    vllm_endpoint: list[str] | None = Field(
        default=None,
        description="The tutorial's name for --hidden-states-endpoint: it names our hidden-state service "
        "(`dflash serve-hidden-states`), not a plain vLLM server.",
    )
    service_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Give up when no endpoint delivered anything for this long (all down or stuck).",
    )

    @model_validator(mode="after")
    def _tutorial_endpoint_name(self) -> HiddenStateSource:
        if not self.vllm_endpoint:
            return self
        if self.hidden_states_endpoint and self.hidden_states_endpoint != self.vllm_endpoint:
            raise ValueError(
                "--vllm-endpoint and --hidden-states-endpoint name different services; give one of them"
            )
        if not self.hidden_states_endpoint:
            logging.getLogger(__name__).warning(
                "--vllm-endpoint %s: taken as --hidden-states-endpoint (a `dflash serve-hidden-states` "
                "service, which also serves vLLM's hidden states)",
                " ".join(self.vllm_endpoint),
            )
            # Plain assignment would re-run this validator (validate_assignment).
            object.__setattr__(self, "hidden_states_endpoint", list(self.vllm_endpoint))
        return self


class Placement(JobConfig):
    """where to run"""

    device: str = Field(
        default="auto",
        description="`auto`, `cpu`, `cuda` or `cuda:N`; under torchrun each rank takes `cuda:<LOCAL_RANK>`.",
    )
    compile: bool = Field(
        default=True,
        description="On CUDA, torch.compile each draft layer (fused norms, RoPE, casts; compiles once per "
        "process, a few minutes at 8B shapes); CPU runs stay eager.",
    )
    nproc: int = Field(
        default=1,
        gt=0,
        description="Training processes on this host (one per GPU): > 1 relaunches the command under "
        "`torchrun --standalone --nproc-per-node N` with FSDP2. Ignored inside torchrun.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Compute dtype of the verifier and of autocast over float32 master weights; "
        "auto = bfloat16 on CUDA, float32 on CPU (bfloat16 is ~2.5x faster on CPUs with AVX512-BF16).",
    )


class TrainConfig(
    TrainTarget, DrafterShape, Optimisation, Evaluation, Reporting, HiddenStateSource, Placement
):
    """`dflash train`: one DFlash training run (the REST job spec is this model too)."""

    @property
    def resolved_gamma(self) -> float:
        """DFlash's decay: gamma 7 for block 16 and 4 for block 8, interpolated linearly otherwise."""
        if self.gamma is not None:
            return self.gamma
        return max(1.0, 4.0 + (self.block_size - 8) * 3.0 / 8.0)
