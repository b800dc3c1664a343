"""Configuration of `dflash trainer-agent`: a flag, else a DFLASH_AGENT_<NAME> variable, else the
default. The token is never a flag (flags show in `ps`): --token-file, else the variable
$DFLASH_CONTROL_PLANE_TOKEN. It is this agent's token (a line of the control plane's
--agent-token-file) or the admin token; the trainers it starts get tokens of their own."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DFLASH_AGENT_", extra="forbid")

    control_plane: str = Field(description="The control plane's URL, e.g. http://control-plane:8600.")
    name: str = Field(
        default_factory=socket.gethostname,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="This agent's name, unique among agents; a restart under the same name re-adopts "
        "the trainers it left running. Default: the hostname.",
    )
    gpus: str = Field(
        default="auto",
        description="GPU indices jobs may use (`0,1`), `auto` (every GPU nvidia-smi lists) or `none`.",
    )
    max_jobs: int = Field(default=1, ge=1, description="Jobs run at once (each on its own GPUs).")
    work_dir: Path = Field(
        default=Path("dflash-agent"),
        description="Per-job trainer configs and logs, and the agent's own state (what it runs).",
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding this agent's token (from the control plane's --agent-token-file).",
    )
    python: str = Field(default=sys.executable, description="Interpreter that runs `dflash train`.")
    heartbeat_interval_s: float | None = Field(
        default=None, gt=0, description="Seconds between heartbeats; default: what the control plane asks."
    )
    stop_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="On SIGTERM, seconds the trainers get to write a checkpoint before SIGKILL.",
    )

    @field_validator("control_plane")
    @classmethod
    def _is_http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"--control-plane must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_text(cls, value: Any) -> Any:
        if isinstance(value, list):  # a list from Python callers
            return ",".join(map(str, value))
        return value

    def gpu_list(self) -> list[int]:
        """The GPUs to register. Raises ValueError for text that is no list of indices."""
        text = self.gpus.strip().lower()
        if text == "auto":
            from services.control_plane.gpus import detect_gpus

            return detect_gpus()
        if text in ("none", ""):
            return []
        try:
            gpus = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--gpus {self.gpus!r}: expected `auto`, `none` or indices like `0,1`") from None
        if len(set(gpus)) != len(gpus) or any(g < 0 for g in gpus):
            raise ValueError(f"--gpus must be distinct indices >= 0, got {self.gpus!r}")
        return gpus
