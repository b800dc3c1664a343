"""Trackio (`pip install trackio`), wandb-like and local by default: project from $TRACKIO_PROJECT,
else `dflash`; the data lives under $TRACKIO_DIR (trackio's default: the Hugging Face cache)."""

from __future__ import annotations

import os
from typing import Any


class TrackioSink:
    def __init__(self, *, run_name: str | None, run_config: dict[str, Any]) -> None:
        import trackio

        self._trackio = trackio
        self.project = os.environ.get("TRACKIO_PROJECT", "dflash")
        self.run = trackio.init(project=self.project, name=run_name, config=run_config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._trackio.log(dict(metrics), step=step)

    def close(self) -> None:
        self._trackio.finish()
