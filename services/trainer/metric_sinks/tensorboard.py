"""TensorBoard event files: `tensorboard --logdir <save_path>/tensorboard`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardSink:
    """One scalar per metric and step, through torch's `SummaryWriter`."""

    def __init__(self, log_dir: Path) -> None:
        # Imported here: it loads the tensorboard package, which a run without this sink never needs.
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._writer_cls = SummaryWriter
        self._writer: Any = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._writer is None:
            # The writer opens at the first step logged. After a resume that is the first step past
            # the checkpoint, and purge_step makes TensorBoard hide what the interrupted run had
            # logged from that step on; without it the curves would double back on themselves.
            self._writer = self._writer_cls(log_dir=str(self.log_dir), purge_step=step)
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=step)
        self._writer.flush()  # once per --log-freq steps: cheap, and a crash loses nothing logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
