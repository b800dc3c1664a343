"""RNG states of torch (CPU and CUDA), numpy and `random` as plain JSON: base64 and ints, no pickle."""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every initialised CUDA device), numpy (legacy global) and python `random`."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "numpy": {
            "bit_generator": np_state[0],
            "keys": _b64(np.asarray(np_state[1], dtype=np.uint32).tobytes()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any] | None) -> None:
    """Inverse of `capture_rng_state`; parts a file lacks are left alone (with a log line)."""
    if not state:
        logger.info("no RNG state in the checkpoint; keeping the current seeds")
        return
    if "torch" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "numpy" in state:
        n = state["numpy"]
        keys = np.frombuffer(base64.b64decode(n["keys"]), dtype=np.uint32)
        np.random.set_state((n["bit_generator"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this host has %d; restoring what fits",
                len(cuda),
                torch.cuda.device_count(),
            )
        for device, blob in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(
                torch.frombuffer(bytearray(base64.b64decode(blob)), dtype=torch.uint8), device
            )
