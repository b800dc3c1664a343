"""Real hidden-state services for tests, in-process or as a separate process, on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from dflash_core.config import ServeHiddenStatesConfig
from services.hidden_states.backends.transformers_backend import TransformersBackend
from services.hidden_states.launcher import LocalService
from services.hidden_states.server import HiddenStateServer


@contextlib.contextmanager
def running_service(
    model_path: Path, *, target_layer_ids: list[int], dtype: str = "float32", **server_kwargs
) -> Iterator[HiddenStateServer]:
    backend = TransformersBackend.load(
        str(model_path), target_layer_ids=target_layer_ids, dtype=getattr(torch, dtype), device="cpu"
    )
    server = HiddenStateServer(backend, host="127.0.0.1", port=0, **server_kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


def start_service_process(model_path: Path, layer_ids: list[int], *, port: int = 0) -> LocalService:
    """The service as its own process (float32, CPU), e.g. to SIGKILL it mid-stream."""
    config = ServeHiddenStatesConfig(
        model=str(model_path), target_layer_ids=layer_ids, device="cpu", dtype="float32", port=port
    )
    return LocalService.start(config, timeout_s=60)
