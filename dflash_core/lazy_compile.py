"""`torch.compile` of a plain function, built on first use and shared by every caller.

Not at import time: calling torch.compile imports dynamo (seconds), even though compiling itself
waits for the first call; CPU-only users of the modules that need it never pay for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


@functools.cache
def compiled(fn: F) -> F:
    """The one compiled wrapper of `fn` (so its compiled graphs are cached once per process)."""
    return torch.compile(fn)  # type: ignore[return-value]
