"""Weights & Biases (`pip install wandb`): project from $WANDB_PROJECT, else `dflash`.

wandb's own environment variables apply as usual: WANDB_API_KEY, WANDB_ENTITY, WANDB_MODE=offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class WandbSink:
    def __init__(self, *, run_name: str | None, run_config: dict[str, Any], directory: Path) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dflash"),
            name=run_name,
            config=run_config,
            dir=str(directory),  # wandb keeps its files in <directory>/wandb
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()
