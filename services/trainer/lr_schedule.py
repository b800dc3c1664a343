"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Built on `LambdaLR` so its state is the standard scheduler `state_dict()` that checkpoints
carry (`scheduler_state_dict.pt`).
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier 0->1 over `warmup_steps`, then cosine from 1 to `min_lr_ratio` at `total_steps`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
