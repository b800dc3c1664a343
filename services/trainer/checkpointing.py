"""Saving and restoring the trainer: epoch folders, step folders, `latest` and `checkpoint_best`.

The on-disk format (speculators-compatible, atomic writes) is `dflash_core.checkpoint`'s; this
module decides WHEN and WHERE to save and what training state to carry:

    <save_path>/0/, 1/, ...   one per finished epoch (kept)
    <save_path>/step-<n>/     every --checkpoint-freq steps (only the newest is kept)
    latest -> newest of those; checkpoint_best -> the epoch with the lowest val loss
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

if TYPE_CHECKING:
    from services.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"


class Checkpointer:
    def __init__(self, *, root: Path, drafter_config: DrafterConfig, train_config: TrainConfig) -> None:
        self.root = Path(root)
        self.drafter_config = drafter_config
        self.train_config = train_config

    def save_epoch(self, trainer: Trainer, *, epoch: int, is_best: bool) -> Path:
        path = self._save(trainer, self.root / str(epoch))
        if is_best:
            update_link(self.root, "checkpoint_best", path)
        self._drop_step_folders(keep=None)
        return path

    def save_step(self, trainer: Trainer) -> Path:
        path = self._save(trainer, self.root / f"{STEP_PREFIX}{trainer.state.global_step:08d}")
        self._drop_step_folders(keep=path)
        return path

    def _save(self, trainer: Trainer, path: Path) -> Path:
        save_checkpoint(
            path,
            drafter_state=trainer.drafter.state_dict(),
            config=self.drafter_config,
            optimizer_state=trainer.optimizer.state_dict(),
            scheduler_state=trainer.scheduler.state_dict(),
            training_state=training_state_of(trainer),
        )
        update_link(self.root, "latest", path)
        logger.info("checkpoint %s (step %d)", path, trainer.state.global_step)
        return path

    def _drop_step_folders(self, *, keep: Path | None) -> None:
        """Step folders only serve resumes; once a newer checkpoint exists they are dead weight."""
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
        "best_epoch": state.best_epoch,
        "history": state.history,
        # The data plan is a pure function of these, so they pin the data position.
        "data": {
            "seed": trainer.config.seed,
            "num_train_rows": len(trainer.train_indices),
            "num_val_rows": len(trainer.val_indices),
            "total_seq_len": trainer.config.total_seq_len,
            "batch_size": trainer.config.batch_size,
        },
    }


def restore_training(trainer: Trainer, path: Path) -> None:
    """Load weights, optimizer, scheduler and position from `path`; refuse a different data plan."""
    loaded = load_checkpoint(path, map_location=trainer.device)
    saved = loaded.training_state
    data = saved.get("data", {})
    current = training_state_of(trainer)["data"]
    changed = {k: (data[k], current[k]) for k in current if k in data and data[k] != current[k]}
    if changed:
        detail = ", ".join(f"{k}: checkpoint {old} vs now {new}" for k, (old, new) in changed.items())
        raise ValueError(
            f"cannot resume from {path}: the data plan changed ({detail}); resuming would repeat or skip "
            "samples. Restore the original settings, or pass --no-resume / a new --save-path"
        )
    trainer.drafter.load_state_dict(loaded.state_dict, strict=True)
    if loaded.optimizer_state is not None:
        trainer.optimizer.load_state_dict(loaded.optimizer_state)
    if loaded.scheduler_state is not None:
        trainer.scheduler.load_state_dict(loaded.scheduler_state)
    state = trainer.state
    state.epoch = saved["epoch"]
    state.step_in_epoch = saved["step_in_epoch"]
    state.global_step = saved["global_step"]
    best = saved.get("best_val_loss")
    state.best_val_loss = math.inf if best is None else best
    state.best_epoch = saved.get("best_epoch")
    state.history = saved.get("history", [])
    restore_rng_state(saved.get("rng"))
    logger.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.global_step)
