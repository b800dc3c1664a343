"""Real hidden-state services for tests, in-process or as a separate process, on 127.0.0.1.

    with running_service(path, target_layer_ids=[1, 2]) as server:     # same process, port 0
        channel = open_channel(server.address)

    service = start_service_process(path, [1, 2])                       # its own process, port 0
    service.kill()                                                      # SIGKILL mid-stream
    service = start_service_process(path, [1, 2], port=service.port)    # back on the same port
    service.stop()                                                      # SIGTERM: drain, exit 0

In-process servers are cheap (no interpreter start) and expose their internals
(`server.scheduler.samples_served`); processes are for what only a process shows: a crash, a
restart on the same port, the exit code, the ready line the scripts wait for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dflash_core.config import ServeHiddenStatesConfig
from services.hidden_states.backends.transformers_backend import TransformersBackend
from services.hidden_states.launcher import LocalService
from services.hidden_states.server import HiddenStateServer


@contextlib.contextmanager
def running_service(
    model_path: Path | str,
    *,
    target_layer_ids: Sequence[int],
    dtype: str = "float32",
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
    **server_kwargs: Any,
) -> Iterator[HiddenStateServer]:
    """An in-process service (transformers backend, CPU) on 127.0.0.1, a free port; stopped after.

    `max_length`/`max_batch_tokens` go to the backend (None keeps the service's defaults);
    `server_kwargs` to `HiddenStateServer` (max_frame_bytes, max_streams, max_pending_per_stream).
    """
    backend_kwargs = {
        name: value
        for name, value in (("max_length", max_length), ("max_batch_tokens", max_batch_tokens))
        if value is not None
    }
    backend = TransformersBackend.load(
        str(model_path),
        target_layer_ids=list(target_layer_ids),
        dtype=getattr(torch, dtype),
        device="cpu",
        **backend_kwargs,
    )
    server = HiddenStateServer(backend, host="127.0.0.1", port=0, **server_kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


def start_service_process(model_path: Path | str, layer_ids: Sequence[int], *, port: int = 0) -> LocalService:
    """`python -m services.hidden_states.main` as its own process, on CPU in float32 (tests compare
    with float32 references): to SIGKILL it mid-stream, restart it on the same port, read its
    exit code."""
    config = ServeHiddenStatesConfig(
        model=str(model_path), target_layer_ids=list(layer_ids), device="cpu", dtype="float32", port=port
    )
    return LocalService.start(config, timeout_s=120)
