"""Saving and restoring the trainer: epoch folders, step folders, `latest` and `checkpoint_best`.

The on-disk format (speculators-compatible, atomic writes) is `dflash_core.checkpoint`'s; this
module decides WHEN and WHERE to save and what training state to carry:

    <save_path>/0/, 1/, ...   one per finished epoch (kept)
    <save_path>/step-<n>/     every --checkpoint-freq steps (only the newest is kept)
    latest -> newest of those; checkpoint_best -> the best epoch by --best-metric (lowest val
    loss, or highest live tau measured at the epoch's end; only epoch folders are kept, so only
    they can be best)

training_state.json also records the live-acceptance results (`eval_history`, one entry per
evaluation) and the best values of both metrics, so a resume keeps choosing checkpoint_best the
same way; a resume under another --best-metric re-picks it from those histories.

Under FSDP every rank takes part in gathering the full tensors and rank 0 alone writes; the
files are the same whatever the number of ranks, so a run resumes on another number of ranks
as long as the global batch (ranks x --batch-size) is the same.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dflash_core.checkpoint import load_checkpoint, save_checkpoint, update_link
from dflash_core.config import TrainConfig
from dflash_core.model.config import DrafterConfig
from dflash_core.rng_state import restore_rng_state
from services.trainer.distributed import full_state, load_full_state

if TYPE_CHECKING:
    from services.trainer.trainer import Trainer, TrainState

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"


class Checkpointer:
    def __init__(
        self, *, root: Path, drafter_config: DrafterConfig, train_config: TrainConfig, is_main: bool = True
    ) -> None:
        self.root = Path(root)
        self.drafter_config = drafter_config
        self.train_config = train_config
        self.is_main = is_main

    def save_epoch(self, trainer: Trainer, *, epoch: int, is_best: bool) -> Path:
        path = self._save(trainer, self.root / str(epoch))
        if is_best and self.is_main:
            update_link(self.root, "checkpoint_best", path)
        self._drop_step_folders(keep=None)
        return path

    def save_step(self, trainer: Trainer) -> Path:
        path = self._save(trainer, self.root / f"{STEP_PREFIX}{trainer.state.global_step:08d}")
        self._drop_step_folders(keep=path)
        return path

    def _save(self, trainer: Trainer, path: Path) -> Path:
        model_state, optimizer_state = full_state(trainer.drafter, trainer.optimizer)  # every rank
        if trainer.dist.is_main:
            save_checkpoint(
                path,
                drafter_state=model_state,
                config=self.drafter_config,
                optimizer_state=optimizer_state,
                scheduler_state=trainer.scheduler.state_dict(),
                training_state=training_state_of(trainer),
            )
            update_link(self.root, "latest", path)
            logger.info("checkpoint %s (step %d)", path, trainer.state.global_step)
        # Nobody moves on (or drops step folders) before the checkpoint is complete.
        trainer.dist.barrier()
        return path

    def _drop_step_folders(self, *, keep: Path | None) -> None:
        """Step folders only serve resumes; once a newer checkpoint exists they are dead weight."""
        if not self.is_main:
            return
        for folder in self.root.glob(f"{STEP_PREFIX}*"):
            if folder != keep and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)


def training_state_of(trainer: Trainer) -> dict:
    state = trainer.state
    return {
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "best_tau": state.best_tau if math.isfinite(state.best_tau) else None,
        "best_metric": trainer.config.best_metric,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "eval_history": state.eval_history,
        # The data plan is a pure function of these, so they pin the data position.
        "data": {
            "seed": trainer.config.seed,
            "num_train_rows": len(trainer.train_indices),
            "num_val_rows": len(trainer.val_indices),
            "total_seq_len": trainer.config.total_seq_len,
            "global_batch_size": trainer.global_batch_size,
        },
        # Informational: resuming on another number of ranks is fine (same global batch).
        "world_size": trainer.dist.world_size,
    }


def restore_training(trainer: Trainer, path: Path) -> None:
    """Load weights, optimizer, scheduler and position from `path`; refuse a different data plan.

    Rank 0 reads the files; the other ranks receive the tensors and the state from it.
    """
    loaded = load_checkpoint(path, map_location="cpu") if trainer.dist.is_main else None
    saved = trainer.dist.broadcast_object(loaded.training_state if loaded is not None else None)
    check_same_data_plan(saved, training_state_of(trainer), path=path)
    load_full_state(
        trainer.drafter,
        trainer.optimizer,
        loaded.state_dict if loaded is not None else {},
        loaded.optimizer_state if loaded is not None else None,
        context=trainer.dist,
    )
    scheduler_state = trainer.dist.broadcast_object(loaded.scheduler_state if loaded is not None else None)
    if scheduler_state is not None:
        trainer.scheduler.load_state_dict(scheduler_state)
    state = trainer.state
    state.epoch = saved["epoch"]
    state.step_in_epoch = saved["step_in_epoch"]
    state.global_step = saved["global_step"]
    best = saved.get("best_val_loss")
    state.best_val_loss = math.inf if best is None else best
    state.best_epoch = saved.get("best_epoch")
    state.history = saved.get("history", [])
    restore_best_tau(state, saved, path=path)
    saved_metric = saved.get("best_metric", "val_loss")  # files from before --best-metric: val loss
    if saved_metric != trainer.config.best_metric:
        repick_best(trainer, saved_metric=saved_metric)
    restore_rng_state(saved.get("rng"))
    logger.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.global_step)


def restore_best_tau(state: TrainState, saved: dict, *, path: Path) -> None:
    """Live-acceptance bookkeeping; a file written before it existed starts with none."""
    if "eval_history" not in saved:
        logger.info(
            "%s has no live-acceptance history (written before --eval-every existed): starting one", path
        )
    state.eval_history = list(saved.get("eval_history") or [])
    best = saved.get("best_tau")
    state.best_tau = -math.inf if best is None else float(best)


def best_epoch_by(metric: str, state: TrainState) -> int | None:
    """The epoch a metric picks from the histories: lowest epoch-end val loss, or highest epoch-end tau."""
    if metric == "tau":
        taus = [
            (entry["eval/tau"], entry["end_of_epoch"])
            for entry in state.eval_history
            if entry.get("end_of_epoch") is not None and entry.get("eval/tau") is not None
        ]
        return max(taus, key=lambda pair: pair[0])[1] if taus else None
    losses = [(row["val/loss"], row["epoch"]) for row in state.history if row.get("epoch", -1) >= 0]
    return min(losses, key=lambda pair: pair[0])[1] if losses else None


def repick_best(trainer: Trainer, *, saved_metric: str) -> None:
    """The run resumes under another --best-metric: checkpoint_best moves to that metric's best epoch."""
    metric, state = trainer.config.best_metric, trainer.state
    state.best_epoch = best_epoch_by(metric, state)
    logger.warning(
        "--best-metric changed from %s to %s on resume: checkpoint_best is re-picked by %s (epoch %s)",
        saved_metric, metric, metric, state.best_epoch,
    )  # fmt: skip
    folder = trainer.checkpointer.root / str(state.best_epoch)
    if state.best_epoch is not None and trainer.dist.is_main and trainer.config.save_best and folder.is_dir():
        update_link(trainer.checkpointer.root, "checkpoint_best", folder)


def check_same_data_plan(saved: dict, current: dict, *, path: Path) -> None:
    """The data plan is a pure function of `data`: any change would repeat or skip samples."""
    data = dict(saved.get("data", {}))
    if "batch_size" in data:  # written before data-parallel training: one rank
        data["global_batch_size"] = data.pop("batch_size")
    now = current["data"]
    changed = {k: (data[k], now[k]) for k in now if k in data and data[k] != now[k]}
    if not changed:
        return
    detail = ", ".join(f"{k}: checkpoint {old} vs now {new}" for k, (old, new) in changed.items())
    hint = ""
    if "global_batch_size" in changed:
        ranks = current.get("world_size", 1)
        per_rank = now["global_batch_size"] // ranks
        hint = (
            f" The global batch is ranks x --batch-size ({ranks} x {per_rank} now; the "
            f"checkpoint was written by {saved.get('world_size', 1)} rank(s)): choose --batch-size so the "
            "product matches."
        )
    raise ValueError(
        f"cannot resume from {path}: the data plan changed ({detail}); resuming would repeat or skip "
        f"samples.{hint} Restore the original settings, or pass --no-resume / a new --save-path"
    )
