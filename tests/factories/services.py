"""Real hidden-state services for tests, in-process or as a separate process, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from services.hidden_states.backends.transformers_backend import TransformersBackend
from services.hidden_states.main import READY_LINE
from services.hidden_states.server import HiddenStateServer

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_service(
    model_path: Path, *, target_layer_ids: list[int], dtype: str = "float32", **server_kwargs
) -> Iterator[HiddenStateServer]:
    backend = TransformersBackend(
        str(model_path), target_layer_ids=target_layer_ids, dtype=getattr(torch, dtype), device="cpu"
    )
    server = HiddenStateServer(backend, host="127.0.0.1", port=0, **server_kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    port: int
    output: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, model_path: Path, layer_ids: list[int], *, port: int = 0, timeout_s: float = 60.0
    ) -> ServiceProcess:
        command = [sys.executable, "-m", "services.hidden_states.main", str(model_path),
                   "--target-layer-ids", *map(str, layer_ids),
                   "--device", "cpu", "--dtype", "float32", "--port", str(port)]  # fmt: skip
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        output: list[str] = []
        ready = threading.Event()
        bound: list[int] = []

        def pump() -> None:
            for line in process.stdout:  # type: ignore[union-attr]
                output.append(line)
                if line.startswith(READY_LINE):
                    bound.append(int(line.rsplit(":", 1)[1]))
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the service did not start:\n" + "".join(output))
        return cls(process=process, port=bound[0], output=output)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
