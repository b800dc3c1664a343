"""The DFlash training loop: `Trainer.train()` and `Trainer.train_step()`, nothing else.

Building the parts (verifier, drafter, optimizer, data) is `services.trainer.main`'s job; saving
is `dflash_core.checkpoint`'s. The loop reads as a list of steps:

    for each epoch: for each step of the epoch's plan:
        fetch hidden states -> sample anchors -> forward -> backward -> clip -> optimizer step
        log every --log-freq steps, checkpoint every --checkpoint-freq steps
    at each epoch end: validate, checkpoint into <save_path>/<epoch>, move latest / checkpoint_best
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dflash_core.anchors import sample_anchors
from dflash_core.batch import PackedBatch
from dflash_core.config import TrainConfig
from dflash_core.loss import LossConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import dflash_forward
from services.trainer.batches import BatchBuilder
from services.trainer.checkpointing import Checkpointer
from services.trainer.data import EpochPlan, anchor_generator, plan_epoch, validation_anchor_generator
from services.trainer.lr_schedule import warmup_cosine
from services.trainer.metrics import MetricSinks
from services.trainer.step_metrics import SlotStats

logger = logging.getLogger(__name__)

# Steps whose samples are announced to the hidden-state source ahead of time. A remote source
# fetches them while this step computes; its --inflight-bytes budget is the real limit.
PREFETCH_STEPS = 8


@dataclass
class TrainState:
    """Where the run is. Saved in training_state.json; enough to resume exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps finished in `epoch`
    global_step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)  # val metrics per epoch


@dataclass
class StepTimes:
    fetch: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.fetch + self.forward + self.backward + self.optimizer


class Trainer:
    def __init__(
        self,
        *,
        config: TrainConfig,
        drafter: DFlashDrafter,
        heads: VerifierHeads,
        batches: BatchBuilder,
        train_indices: list[int],
        val_indices: list[int],
        optimizer: torch.optim.Optimizer,
        checkpointer: Checkpointer,
        sinks: MetricSinks,
        state: TrainState,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.config = config
        self.drafter = drafter
        self.heads = heads
        self.batches = batches
        self.train_indices = train_indices
        self.val_indices = val_indices
        self.optimizer = optimizer
        self._plans: dict[int, EpochPlan] = {}
        self.checkpointer = checkpointer
        self.sinks = sinks
        self.state = state
        self.autocast_dtype = autocast_dtype
        self.device = batches.device
        self.loss_config = LossConfig(
            kind=config.loss,
            weighting=config.loss_weighting,
            gamma=config.resolved_gamma,
            dpace_alpha=config.dpace_alpha,
        )
        self.attention = "flex" if self.device.type == "cuda" else "sdpa"
        self.scheduler = warmup_cosine(
            optimizer,
            warmup_steps=config.warmup_steps,
            total_steps=self.total_steps(),
            min_lr_ratio=config.min_lr_ratio,
        )

    # ------------------------------------------------------------------ plan
    def epoch_plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans[epoch] = self._make_plan(epoch)
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.train_indices,
            [self.batches.rows.lengths[i] for i in self.train_indices],
            epoch=epoch,
            seed=self.config.seed,
            total_seq_len=self.config.total_seq_len,
            batch_size=self.config.batch_size,
        )

    def total_steps(self) -> int:
        """Optimizer steps of the whole run; fixes the LR schedule's length.

        Packing depends on each epoch's shuffle, so epochs can differ by a step or two.
        """
        total = sum(len(self.epoch_plan(epoch)) for epoch in range(self.config.epochs))
        return min(total, self.config.max_steps) if self.config.max_steps else total

    # ------------------------------------------------------------------ loop
    def train(self, *, stop_after_steps: int | None = None) -> TrainState:
        """Run to the end (or `stop_after_steps` more steps, used to test resume). Returns the state."""
        total_steps = self.total_steps()
        steps_this_call = 0
        if self.state.global_step == 0 and not self.state.history:
            self._baseline_validation()
        window = SlotStats.empty(self.config.block_size, self.device)
        times = StepTimes()
        while self.state.epoch < self.config.epochs and self.state.global_step < total_steps:
            plan = self.epoch_plan(self.state.epoch)
            bar = tqdm(
                total=len(plan),
                initial=self.state.step_in_epoch,
                desc=f"epoch {self.state.epoch}",
                unit="step",
                dynamic_ncols=True,
                leave=False,
                disable=None,
            )
            for step_index in range(self.state.step_in_epoch, len(plan.steps)):
                step_rows = plan.steps[step_index]
                if self.state.global_step >= total_steps:
                    break
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    bar.close()
                    return self.state
                self.batches.prefetch(plan.steps[step_index + 1 : step_index + 1 + PREFETCH_STEPS])
                self.train_step(step_rows, window=window, times=times)
                steps_this_call += 1
                self.state.step_in_epoch += 1
                self.state.global_step += 1
                bar.update(1)
                if self.state.global_step % self.config.log_freq == 0:
                    self._log_window(window, times, bar)
                    window, times = SlotStats.empty(self.config.block_size, self.device), StepTimes()
                if self.config.checkpoint_freq and self.state.global_step % self.config.checkpoint_freq == 0:
                    self.checkpointer.save_step(self)
            bar.close()
            if self.state.step_in_epoch >= len(plan) or self.state.global_step >= total_steps:
                self._end_epoch()
        return self.state

    def train_step(self, step_rows: list[list[int]], *, window: SlotStats, times: StepTimes) -> None:
        """One optimizer step over the packed rows of this step."""
        self.drafter.train()
        # 1. fetch: hidden states from the source, packed into rows on the device
        t0 = time.perf_counter()
        batch = self.batches.build(step_rows)
        t1 = time.perf_counter()
        times.fetch += t1 - t0
        if batch is None:
            # Every sample was dropped (--on-missing skip|warn): the data position still advances
            # (the caller counts the step), but there is nothing to learn from.
            logger.debug("step %d: no sample has hidden states; skipped", self.state.global_step)
            return
        # 2. forward: anchors are resampled each epoch but fixed per (epoch, step) for exact resume
        generator = anchor_generator(
            seed=self.config.seed, epoch=self.state.epoch, step=self.state.step_in_epoch
        )
        out = self._forward(batch, generator)
        t2 = time.perf_counter()
        # 3. backward
        out.loss.backward()
        t3 = time.perf_counter()
        # 4. clip and step. clip_grad_norm_ returns a device tensor: no host sync here.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        window.add(out, grad_norm=grad_norm.detach(), tokens=batch.num_tokens, samples=batch.num_documents)
        times.forward += t2 - t1
        times.backward += t3 - t2
        times.optimizer += t4 - t3

    def _forward(self, batch: PackedBatch, generator: torch.Generator):
        # Anchors are drawn on the host from a CPU generator, so they do not depend on the device.
        # The compiled flex path wants one shape every step (else it recompiles): pad to max_anchors.
        anchors, anchor_valid = sample_anchors(
            batch.loss_mask.cpu(),
            batch.document_ids.cpu(),
            block_size=self.config.block_size,
            max_anchors=self.config.max_anchors,
            generator=generator,
            pad_to_max=self.attention == "flex",
        )
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            return dflash_forward(
                self.drafter,
                self.heads,
                batch,
                anchors=anchors.to(self.device),
                anchor_valid=anchor_valid.to(self.device),
                loss_config=self.loss_config,
                attention=self.attention,
            )

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val_indices:
            return {}
        self.drafter.eval()
        plan = plan_epoch(
            self.val_indices,
            [self.batches.rows.lengths[i] for i in self.val_indices],
            epoch=0,
            seed=self.config.seed,
            total_seq_len=self.config.total_seq_len,
            batch_size=self.config.batch_size,
            shuffle=False,
        )
        stats = SlotStats.empty(self.config.block_size, self.device)
        for index, step_rows in enumerate(plan.steps):
            self.batches.prefetch(plan.steps[index + 1 : index + 1 + PREFETCH_STEPS])
            batch = self.batches.build(step_rows)
            if batch is None:  # every sample dropped (--on-missing skip|warn)
                logger.debug("validation batch %d: no sample has hidden states; skipped", index)
                continue
            out = self._forward(batch, validation_anchor_generator(seed=self.config.seed, batch_index=index))
            stats.add(out, grad_norm=None, tokens=batch.num_tokens, samples=batch.num_documents)
        # No batch at all would summarise to a fake loss of 0.0 and win checkpoint_best.
        return stats.summary(prefix="val/") if stats.steps else {}

    def _baseline_validation(self) -> None:
        """Val metrics of the untrained drafter (history epoch -1): the yardstick for every epoch."""
        val = self.validate()
        if val:
            self.state.history.append({"epoch": -1, **val})
            self.sinks.log({**val, "epoch": -1.0}, 0)

    def _end_epoch(self) -> None:
        val = self.validate()
        finished_epoch = self.state.epoch
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        is_best = False
        if val and val["val/loss"] < self.state.best_val_loss:
            self.state.best_val_loss = val["val/loss"]
            self.state.best_epoch = finished_epoch
            is_best = True
        if val:
            self.state.history.append({"epoch": finished_epoch, **val})
            self.sinks.log({**val, "epoch": float(finished_epoch)}, self.state.global_step)
        self.checkpointer.save_epoch(self, epoch=finished_epoch, is_best=is_best and self.config.save_best)

    def _log_window(self, window: SlotStats, times: StepTimes, bar: tqdm) -> None:
        if not window.steps:
            return  # every step of the window was skipped: nothing measured, log nothing
        metrics = window.summary(prefix="train/")  # host sync: once per --log-freq steps
        elapsed = max(times.total, 1e-9)
        metrics.update(
            {
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/tokens_per_s": window.tokens / elapsed,
                "train/samples_per_s": window.samples / elapsed,
                "train/data_wait_frac": times.fetch / elapsed,
                "time/fetch_s": times.fetch / max(window.steps, 1),
                "time/forward_s": times.forward / max(window.steps, 1),
                "time/backward_s": times.backward / max(window.steps, 1),
                "time/optimizer_s": times.optimizer / max(window.steps, 1),
                "epoch": self.state.epoch
                + self.state.step_in_epoch / max(len(self.epoch_plan(self.state.epoch)), 1),
            }
        )
        if self.device.type == "cuda":
            metrics["gpu/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        bar.set_postfix(
            loss=f"{metrics['train/loss']:.3f}",
            acc=f"{metrics['train/acc']:.3f}",
            eal=f"{metrics['train/eal']:.2f}",
        )
        self.sinks.log(metrics, self.state.global_step)
