"""How a client pulls hidden states from the service: shared by `dflash train` and `generate-offline`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from dflash_core.config.base import JobConfig


class HiddenStateTransfer(JobConfig):
    """hidden-state transfer: where computed states are cached and how many bytes are in flight"""

    hidden_states_cache: Path | None = Field(
        default=None, description="Folder of the hidden-state cache; default `<data-path>/hidden_states`."
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
