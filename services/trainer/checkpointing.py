"""Saving and restoring the trainer: epoch folders, step folders, `latest` and `checkpoint_best`.

The on-disk format (speculators-compatible, atomic writes) is `dflash_core.checkpoint`'s; this
module decides WHERE to save and what training state to carry:

    <save_path>/0/, 1/, ...   one per finished epoch (kept)
    <save_path>/step-<n>/     every --checkpoint-freq steps (only the newest is kept)
    latest -> newest of those; checkpoint_best -> the best epoch by --best-metric (lowest val
    loss, or highest live tau measured at the epoch's end; only epoch folders are kept, so only
    they can be best)

It never sees the trainer, which decides WHEN: each call is handed the model, optimizer,
scheduler and `TrainState` (whose `state_dict()` is most of training_state.json).

training_state.json also records the live-acceptance results (`eval_history`, one entry per
evaluation) and the best values of both metrics, so a resume keeps choosing checkpoint_best the
same way; a resume under another --best-metric re-picks it from those histories.

Under FSDP every rank takes part in gathering the full tensors and rank 0 alone writes; the
files are the same whatever the number of ranks, so a run resumes on another number of ranks
as long as the global batch (ranks x --batch-size) is the same.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dflash_core.checkpoint import load_checkpoint, save_checkpoint, update_link
from dflash_core.model.config import DrafterConfig
from dflash_core.rng_state import restore_rng_state
from services.trainer.distributed import DistContext, full_state, load_full_state
from services.trainer.train_state import TrainState, saved_best_metric

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"


@dataclass(frozen=True, kw_only=True)
class DataPlanInputs:
    """What the data plan is a pure function of, so they pin what a saved data position means."""

    seed: int
    num_train_rows: int
    num_val_rows: int
    total_seq_len: int
    global_batch_size: int  # packed rows per optimizer step over all ranks


class Checkpointer:
    """Saves and restores the parts it is handed; knows the run's layout, not the trainer.

    What is fixed for the run (where, the drafter's config, the data plan, the ranks) is given
    here; what changes (model, optimizer, scheduler, `TrainState`) is passed to each call.
    """

    def __init__(
        self,
        *,
        root: Path,
        drafter_config: DrafterConfig,
        data_plan: DataPlanInputs,
        dist: DistContext,
        save_best: bool,
    ) -> None:
        self.root = Path(root)
        self.drafter_config = drafter_config
        self.data_plan = data_plan
        self.dist = dist
        self.save_best = save_best  # --save-best: keep checkpoint_best at the best epoch

    def save_epoch(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainState,
        epoch: int,
        is_best: bool,
    ) -> Path:
        path = self._save(
            self.root / str(epoch), model=model, optimizer=optimizer, scheduler=scheduler, state=state
        )
        if is_best:
            self._link_best(path)
        self._drop_step_folders(keep=None)
        return path

    def save_step(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainState,
    ) -> Path:
        path = self.root / f"{STEP_PREFIX}{state.global_step:08d}"
        self._save(path, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
        self._drop_step_folders(keep=path)
        return path

    def restore(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainState,
    ) -> None:
        """Load weights, optimizer, scheduler, state and RNG from `path`; refuse a different data plan.

        Rank 0 reads the files; the other ranks receive the tensors and the state from it.
        """
        dist = self.dist
        loaded = load_checkpoint(path, map_location="cpu") if dist.is_main else None
        saved = dist.broadcast_object(loaded.training_state if loaded is not None else None)
        check_same_data_plan(saved, self.data_plan, world_size=dist.world_size, path=path)
        load_full_state(
            model,
            optimizer,
            loaded.state_dict if loaded is not None else {},
            loaded.optimizer_state if loaded is not None else None,
            context=dist,
        )
        scheduler_state = dist.broadcast_object(loaded.scheduler_state if loaded is not None else None)
        if scheduler_state is not None:
            scheduler.load_state_dict(scheduler_state)
        state.load_state_dict(saved)
        if saved_best_metric(saved) != state.best_metric and state.best_epoch is not None:
            self._link_best(self.root / str(state.best_epoch))  # the state re-picked it by this metric
        restore_rng_state(saved.get("rng"))
        logger.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.global_step)

    def _save(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainState,
    ) -> Path:
        model_state, optimizer_state = full_state(model, optimizer)  # every rank
        if self.dist.is_main:
            save_checkpoint(
                path,
                drafter_state=model_state,
                config=self.drafter_config,
                optimizer_state=optimizer_state,
                scheduler_state=scheduler.state_dict(),
                training_state=self._training_state(state),
            )
            update_link(self.root, "latest", path)
            logger.info("checkpoint %s (step %d)", path, state.global_step)
        # Nobody moves on (or drops step folders) before the checkpoint is complete.
        self.dist.barrier()
        return path

    def _training_state(self, state: TrainState) -> dict[str, Any]:
        return {
            **state.state_dict(),
            # The data plan is a pure function of these, so they pin the data position.
            "data": asdict(self.data_plan),
            # Informational: resuming on another number of ranks is fine (same global batch).
            "world_size": self.dist.world_size,
        }

    def _link_best(self, folder: Path) -> None:
        """Point checkpoint_best at an epoch folder (rank 0, under --save-best, if the folder is there)."""
        if self.save_best and self.dist.is_main and folder.is_dir():
            update_link(self.root, "checkpoint_best", folder)

    def _drop_step_folders(self, *, keep: Path | None) -> None:
        """Step folders only serve resumes; once a newer checkpoint exists they are dead weight."""
        if not self.dist.is_main:
            return
        for folder in self.root.glob(f"{STEP_PREFIX}*"):
            if folder != keep and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)


def check_same_data_plan(saved: dict, current: DataPlanInputs, *, world_size: int, path: Path) -> None:
    """The data plan is a pure function of `data`: any change would repeat or skip samples."""
    data = dict(saved.get("data", {}))
    if "batch_size" in data:  # written before data-parallel training: one rank
        data["global_batch_size"] = data.pop("batch_size")
    now = asdict(current)
    changed = {k: (data[k], now[k]) for k in now if k in data and data[k] != now[k]}
    if not changed:
        return
    detail = ", ".join(f"{k}: checkpoint {old} vs now {new}" for k, (old, new) in changed.items())
    hint = ""
    if "global_batch_size" in changed:
        per_rank = now["global_batch_size"] // world_size
        hint = (
            f" The global batch is ranks x --batch-size ({world_size} x {per_rank} now; the "
            f"checkpoint was written by {saved.get('world_size', 1)} rank(s)): choose --batch-size so the "
            "product matches."
        )
    raise ValueError(
        f"cannot resume from {path}: the data plan changed ({detail}); resuming would repeat or skip "
        f"samples.{hint} Restore the original settings, or pass --no-resume / a new --save-path"
    )
