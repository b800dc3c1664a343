"""Where a training run is and which epoch is its best: what training_state.json carries.

`TrainState` is stateful the way torch.distributed.checkpoint means it (`state_dict()` /
`load_state_dict()`), so the checkpointer saves and restores it without knowing the trainer. The
best-checkpoint bookkeeping lives here too: the best val loss and live tau seen so far, and the
epoch `checkpoint_best` should point at under --best-metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# training_state.json files written before --best-metric existed picked checkpoint_best by val loss.
LEGACY_BEST_METRIC = "val_loss"


def saved_best_metric(saved: Mapping[str, Any]) -> str:
    """The --best-metric a saved state was written under."""
    return saved.get("best_metric", LEGACY_BEST_METRIC)


@dataclass(kw_only=True)
class TrainState:
    """Where the run is. Saved in training_state.json; enough to resume exactly."""

    best_metric: str  # --best-metric: what picks best_epoch, "val_loss" or "tau"
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps finished in `epoch`
    global_step: int = 0
    best_val_loss: float = math.inf  # lowest epoch-end val loss so far
    best_tau: float = -math.inf  # highest epoch-end live tau so far
    best_epoch: int | None = None  # where checkpoint_best points: the best --best-metric
    history: list[dict] = field(default_factory=list)  # val metrics per epoch
    eval_history: list[dict] = field(default_factory=list)  # live acceptance: step, end_of_epoch, eval/...
    stopped_by: str | None = None  # the signal that ended this call early, if one did (not saved)

    def state_dict(self) -> dict[str, Any]:
        """The keys training_state.json has always had; JSON has no infinity, so "none yet" is None."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "best_tau": self.best_tau if math.isfinite(self.best_tau) else None,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "eval_history": self.eval_history,
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Take a saved position and bests; `best_metric` stays this run's.

        Saved under another --best-metric, `best_epoch` is re-picked from the histories by this
        run's metric (the checkpointer then moves checkpoint_best).
        """
        self.epoch = saved["epoch"]
        self.step_in_epoch = saved["step_in_epoch"]
        self.global_step = saved["global_step"]
        best_loss = saved.get("best_val_loss")
        self.best_val_loss = math.inf if best_loss is None else best_loss
        self.best_epoch = saved.get("best_epoch")
        self.history = saved.get("history", [])
        if "eval_history" not in saved:
            logger.info(
                "the checkpoint has no live-acceptance history (written before --eval-every existed): "
                "starting one"
            )
        self.eval_history = list(saved.get("eval_history") or [])
        best_tau = saved.get("best_tau")
        self.best_tau = -math.inf if best_tau is None else float(best_tau)
        previous_metric = saved_best_metric(saved)
        if previous_metric != self.best_metric:
            self.best_epoch = self.best_epoch_by(self.best_metric)
            logger.warning(
                "--best-metric changed from %s to %s on resume: checkpoint_best is re-picked by %s "
                "(epoch %s)",
                previous_metric, self.best_metric, self.best_metric, self.best_epoch,
            )  # fmt: skip

    def record_best(self, *, epoch: int, val: Mapping[str, float], live: Mapping[str, float]) -> bool:
        """Track the best val loss and live tau; True when `epoch` is the best by --best-metric."""
        loss, tau = val.get("val/loss"), live.get("eval/tau")
        # No validation batch / no draft would give a fake loss of 0 / no tau: they never win.
        better_loss = loss is not None and loss < self.best_val_loss
        better_tau = tau is not None and math.isfinite(tau) and tau > self.best_tau
        if better_loss:
            self.best_val_loss = loss
        if better_tau:
            self.best_tau = tau
        is_best = better_tau if self.best_metric == "tau" else better_loss
        if is_best:
            self.best_epoch = epoch
        return is_best

    def best_epoch_by(self, metric: str) -> int | None:
        """The epoch `metric` picks: the lowest epoch-end val loss, or the highest epoch-end tau."""
        if metric == "tau":
            taus = [
                (entry["eval/tau"], entry["end_of_epoch"])
                for entry in self.eval_history
                if entry.get("end_of_epoch") is not None and entry.get("eval/tau") is not None
            ]
            return max(taus, key=lambda pair: pair[0])[1] if taus else None
        losses = [(row["val/loss"], row["epoch"]) for row in self.history if row.get("epoch", -1) >= 0]
        return min(losses, key=lambda pair: pair[0])[1] if losses else None
