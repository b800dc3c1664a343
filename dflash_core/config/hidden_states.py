"""The hidden-state service's config (`dflash serve-hidden-states`) and its offline client's."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dflash_core.config.base import EMBEDDED_VERIFIER, JobConfig, LayerIds
from dflash_core.config.hidden_state_transfer import HiddenStateTransfer


class VerifierEngine(JobConfig):
    """the verifier and the engine that runs it"""

    model: str = Field(
        default=EMBEDDED_VERIFIER, description="The verifier: HF id, local path or the embedded default."
    )
    target_layer_ids: LayerIds | None = Field(
        default=None,
        description="Layer ids to serve (layer N, the last, is always served too). Default: the 3 ids "
        "`dflash train` picks for this verifier.",
    )
    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="`vllm` (production; runs in vLLM's own environment) or `transformers` (CPU or GPU).",
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

    @model_validator(mode="after")
    def _replicas_generate_only(self) -> VerifierEngine:
        if self.engine_replicas > 1 and (self.backend != "vllm" or not self.generate_only):
            raise ValueError(
                f"--engine-replicas {self.engine_replicas} needs --backend vllm --generate-only (the "
                "transformers backend and hidden-state extraction run one engine)"
            )
        return self


class ServiceLimits(JobConfig):
    """ports and limits: what one client, one call and all of them may take"""

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


class AccessControl(JobConfig):
    """who may call: token, TLS, reflection"""

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
    def _tls_files_together(self) -> AccessControl:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file needs TLS on: give --tls-cert-file and --tls-key-file too")
        return self


class ServeHiddenStatesConfig(VerifierEngine, ServiceLimits, AccessControl):
    """`dflash serve-hidden-states`: the gRPC service that streams the verifier's hidden states."""


class GenerateOfflineConfig(HiddenStateTransfer):
    """`dflash generate-offline`: fill the hidden-state cache from the service ahead of training."""

    data_path: Path = Field(description="Output folder of `dflash prepare-data`.")
    vllm_endpoint: list[str] = Field(description="Hidden-state service addresses.")
    target_layer_ids: LayerIds | None = Field(
        default=None,
        description="Layer ids to cache (must equal the training run's); default: every layer the service "
        "serves except N.",
    )
    total_seq_len: int = Field(
        default=8192, gt=1, description="Truncate samples as `dflash train --total-seq-len` does."
    )
    max_samples: int | None = Field(default=None, gt=0, description="Cache only the first N samples.")
