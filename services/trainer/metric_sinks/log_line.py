"""A compact line in the log for the metrics people watch."""

from __future__ import annotations

import logging

logger = logging.getLogger("services.trainer.metrics")


class LoggingSink:
    """`step N loss=... acc=... eal=...` at INFO, for the metrics whose name (after the prefix) is in KEYS."""

    KEYS = ("loss", "acc", "eal", "lr", "grad_norm", "tokens_per_s", "data_wait_frac")

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = [
            f"{name}={value:.4g}" for name, value in metrics.items() if name.split("/", 1)[-1] in self.KEYS
        ]
        logger.info("step %d %s", step, " ".join(shown))

    def close(self) -> None:
        pass
