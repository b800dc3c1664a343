"""The DFlash training loop: `Trainer.train()` and `Trainer.train_step()`, nothing else.

Building the parts (verifier, drafter, optimizer, data) is `services.trainer.main`'s job; saving
is `services.trainer.checkpointing`'s, handed the parts at each save. The loop reads as a list of steps:

    for each epoch: for each step of the epoch's plan:
        fetch hidden states -> sample anchors -> forward -> backward -> clip -> optimizer step
        log every --log-freq steps, checkpoint every --checkpoint-freq steps
        live acceptance (tau by greedy speculative decoding) every --eval-every steps
    at each epoch end: validate, live acceptance, checkpoint into <save_path>/<epoch>, move latest /
        checkpoint_best (the best --best-metric: lowest val loss or highest live tau)

Data parallel (torchrun, FSDP2): the plan is global, `--batch-size` rows per rank per step; rank r
takes rows r, r + W, ... of each step. Anchors are drawn per row from a generator keyed by the
row's place in the global step, and the loss is the mean over every rank's supervised slots, so
W ranks compute what one rank would with W times the batch. A rank with no row in a step (the
epoch's last, short step; samples dropped by --on-missing skip) runs a placeholder row with no
supervised slot, because every rank must take part in FSDP's collectives.

Between steps the ranks agree (one small all-reduce) on two things: a stop signal (SIGTERM /
SIGINT: checkpoint, then return) and a hidden-state source that gave up (checkpoint, then raise).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dflash_core.anchors import sample_anchors, trim_anchor_padding
from dflash_core.batch import PackedBatch, placeholder_batch
from dflash_core.config import TrainConfig
from dflash_core.loss import LOSS_EPS, LossConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import DFlashOutput, dflash_forward
from services.trainer.batches import BatchBuilder
from services.trainer.checkpointing import Checkpointer
from services.trainer.data import EpochPlan, anchor_generator, plan_epoch, validation_anchor_generator
from services.trainer.distributed import DistContext
from services.trainer.grpc_source import HiddenStateServiceError
from services.trainer.live_eval import LiveAcceptance, acceptance_metrics
from services.trainer.lr_schedule import warmup_cosine
from services.trainer.metrics import MetricSinks
from services.trainer.step_metrics import SlotStats
from services.trainer.stop_signals import StopSignals
from services.trainer.train_state import TrainState

logger = logging.getLogger(__name__)

# Steps whose samples are announced to the hidden-state source ahead of time. A remote source
# fetches them while this step computes; its --inflight-bytes budget is the real limit.
PREFETCH_STEPS = 8


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
        dist: DistContext | None = None,
        stop: StopSignals | None = None,
        live: LiveAcceptance | None = None,
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
        self.dist = dist or DistContext()
        self.stop = stop or StopSignals()
        self.live = live
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
            batch_size=self.global_batch_size,
        )

    @property
    def global_batch_size(self) -> int:
        """Packed rows per optimizer step over all ranks: what the data plan is made of."""
        return self.config.batch_size * self.dist.world_size

    def my_rows(self, step_rows: list[list[int]]) -> list[tuple[int, list[int]]]:
        """This rank's rows of a global step, each with its index in the step."""
        return list(enumerate(step_rows))[self.dist.rank :: self.dist.world_size]

    def total_steps(self) -> int:
        """Optimizer steps of the whole run; fixes the LR schedule's length.

        Packing depends on each epoch's shuffle, so epochs can differ by a step or two.
        """
        total = sum(len(self.epoch_plan(epoch)) for epoch in range(self.config.epochs))
        return min(total, self.config.max_steps) if self.config.max_steps else total

    # ------------------------------------------------------------------ loop
    def train(self, *, stop_after_steps: int | None = None) -> TrainState:
        """Run to the end (or `stop_after_steps` more steps, used to test resume). Returns the state.

        A stop signal ends the call early with a checkpoint (`state.stopped_by` says which); a
        hidden-state source that gives up raises `HiddenStateServiceError`, also after a checkpoint.
        """
        total_steps = self.total_steps()
        steps_this_call = 0
        if self.state.global_step == 0:
            self._baselines()
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
                disable=None if self.dist.is_main else True,
            )
            for step_index in range(self.state.step_in_epoch, len(plan.steps)):
                if self.state.global_step >= total_steps:
                    break
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    bar.close()
                    return self.state
                self._prefetch(plan.steps[step_index + 1 : step_index + 1 + PREFETCH_STEPS])
                if not self.train_step(plan.steps[step_index], window=window, times=times):
                    bar.close()
                    return self.state  # stopped by a signal, checkpoint written
                steps_this_call += 1
                self.state.step_in_epoch += 1
                self.state.global_step += 1
                bar.update(1)
                if self.state.global_step % self.config.log_freq == 0:
                    self._log_window(window, times, bar)
                    window, times = SlotStats.empty(self.config.block_size, self.device), StepTimes()
                if self.config.eval_every and self.state.global_step % self.config.eval_every == 0:
                    self._live_acceptance()
                if self.config.checkpoint_freq and self.state.global_step % self.config.checkpoint_freq == 0:
                    self._save_step()
            bar.close()
            if self.state.step_in_epoch >= len(plan) or self.state.global_step >= total_steps:
                self._end_epoch()
        return self.state

    def _prefetch(self, upcoming_steps: list[list[list[int]]]) -> None:
        self.batches.prefetch([[row for _, row in self.my_rows(step)] for step in upcoming_steps])

    def train_step(self, step_rows: list[list[int]], *, window: SlotStats, times: StepTimes) -> bool:
        """One optimizer step over this rank's share of a global step's rows.

        Returns False when a stop signal ended the run before the step (a checkpoint is written).
        """
        self.drafter.train()
        # 1. fetch: hidden states from the source, packed into rows on the device
        t0 = time.perf_counter()
        rows = self.my_rows(step_rows)
        failure: HiddenStateServiceError | None = None
        try:
            batch = self.batches.build([row for _, row in rows]) if rows else None
        except HiddenStateServiceError as exc:
            batch, failure = None, exc
        stop, failed = self.dist.any([self.stop.requested, failure is not None], device=self.device)
        if failed:
            self._save_before_failing(failure)
        if stop:
            received = self.stop.received
            self.state.stopped_by = received.name if received else "a stop signal on another rank"
            logger.warning("stopping at step %d (%s)", self.state.global_step, self.state.stopped_by)
            self._save_step()
            return False
        t1 = time.perf_counter()
        times.fetch += t1 - t0
        if batch is None and not self.dist.is_distributed:
            # Every sample was dropped (--on-missing skip|warn): the data position still advances
            # (the caller counts the step), but there is nothing to learn from.
            logger.debug("step %d: no sample has hidden states; skipped", self.state.global_step)
            return True
        # 2. forward: anchors are resampled each epoch but fixed per (epoch, step, row) for exact resume
        epoch, step, seed = self.state.epoch, self.state.step_in_epoch, self.config.seed
        generators = [anchor_generator(seed=seed, epoch=epoch, step=step, row=i) for i, _ in rows]
        out, loss = self._forward_and_loss(batch, generators)
        t2 = time.perf_counter()
        # 3. backward. FSDP averages gradients over ranks; `loss` is this rank's share of the mean.
        (loss * self.dist.world_size).backward()
        t3 = time.perf_counter()
        # 4. clip and step. clip_grad_norm_ returns a device tensor: no host sync here.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the same global norm on every rank
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        window.add(
            out,
            loss=loss.detach(),
            grad_norm=grad_norm.detach() / self.dist.world_size,  # summed over ranks when logged
            tokens=batch.num_tokens if batch is not None else 0,
            samples=batch.num_documents if batch is not None else 0,
        )
        times.forward += t2 - t1
        times.backward += t3 - t2
        times.optimizer += t4 - t3
        return True

    def _save_before_failing(self, failure: HiddenStateServiceError | None) -> None:
        """Some rank's hidden-state source gave up: keep what was learned, then raise on every rank."""
        logger.error("no hidden states at step %d; writing a checkpoint first", self.state.global_step)
        path = self._save_step()
        if failure is None:
            failure = HiddenStateServiceError("another rank's hidden-state source gave up (see its log)")
        raise HiddenStateServiceError(f"{failure} (progress saved in {path}; rerun the command to resume)")

    def _save_step(self) -> Path:
        return self.checkpointer.save_step(
            model=self.drafter, optimizer=self.optimizer, scheduler=self.scheduler, state=self.state
        )

    def _forward_and_loss(
        self, batch: PackedBatch | None, generators: list[torch.Generator]
    ) -> tuple[DFlashOutput, torch.Tensor]:
        """The objective on `batch` (a placeholder row when None) and this rank's share of the loss.

        One rank: the batch's own weighted mean. Several: the sum over this rank's slots divided by
        every rank's slot count, so the shares add up to the mean over the global batch.
        """
        if batch is None:
            batch, generators = self._placeholder_batch(), [torch.Generator().manual_seed(0)]
        out = self._forward(batch, generators)
        if not self.dist.is_distributed:
            return out, out.loss
        total = self.dist.sum_(out.loss_count.clone())
        return out, out.loss * (out.loss_count + LOSS_EPS) / (total + LOSS_EPS)

    def _placeholder_batch(self) -> PackedBatch:
        """One padding row with no supervised slot: takes part in the collectives, adds nothing."""
        return placeholder_batch(
            self.drafter.config,
            total_seq_len=self.config.total_seq_len,
            dtype=self.autocast_dtype or torch.float32,
            device=self.device,
        )

    def _forward(self, batch: PackedBatch, generators: list[torch.Generator]) -> DFlashOutput:
        anchors, anchor_valid = self._sample_anchors(batch, generators)
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

    def _sample_anchors(
        self, batch: PackedBatch, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's anchors from its own generator, so they do not depend on how rows are split.

        Drawn on the host from CPU generators (device-independent). The compiled flex path wants
        one shape every step (else it recompiles): it keeps `max_anchors` columns; SDPA trims to
        the most anchors any row has.
        """
        loss_mask, document_ids = batch.loss_mask.cpu(), batch.document_ids.cpu()
        picks = [
            sample_anchors(
                loss_mask[b : b + 1],
                document_ids[b : b + 1],
                max_anchors=self.config.max_anchors,
                generator=generator,
                pad_to_max=True,
            )
            for b, generator in enumerate(generators)
        ]
        anchors = torch.cat([a for a, _ in picks])
        valid = torch.cat([v for _, v in picks])
        if self.attention != "flex":
            anchors, valid = trim_anchor_padding(anchors, valid)
        return anchors, valid

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
            batch_size=self.global_batch_size,
            shuffle=False,
        )
        stats = SlotStats.empty(self.config.block_size, self.device)
        for index, step_rows in enumerate(plan.steps):
            self._prefetch(plan.steps[index + 1 : index + 1 + PREFETCH_STEPS])
            rows = self.my_rows(step_rows)
            batch = self.batches.build([row for _, row in rows]) if rows else None
            if batch is None and not self.dist.is_distributed:
                logger.debug("validation batch %d: no sample has hidden states; skipped", index)
                continue
            generators = [
                validation_anchor_generator(seed=self.config.seed, batch_index=index, row=i) for i, _ in rows
            ]
            out, loss = self._forward_and_loss(batch, generators)
            stats.add(
                out,
                loss=loss,
                grad_norm=None,
                tokens=batch.num_tokens if batch is not None else 0,
                samples=batch.num_documents if batch is not None else 0,
            )
        stats = stats.reduced(self.dist)
        # No batch at all would summarise to a fake loss of 0.0 and win checkpoint_best.
        return stats.summary(prefix="val/") if stats.steps else {}

    def _baselines(self) -> None:
        """Val metrics (history epoch -1) and live tau of the untrained drafter: the yardsticks."""
        if not self.state.history:
            val = self.validate()
            if val:
                self.state.history.append({"epoch": -1, **val})
                self.sinks.log({**val, "epoch": -1.0}, 0)
        if not self.state.eval_history:
            self._live_acceptance()

    # ------------------------------------------------------------------ live acceptance
    def _live_acceptance(self, *, end_of_epoch: int | None = None) -> dict[str, float]:
        """Live tau on the held-out prompts (`services.trainer.live_eval`), logged and kept in the state.

        Every rank takes part (the drafting forwards are collective under FSDP); only rank 0's
        sinks write. A step already measured (an --eval-every step that ends an epoch) is reused.
        """
        if self.live is None:
            return {}
        history, step = self.state.eval_history, self.state.global_step
        if history and history[-1]["step"] == step:
            if end_of_epoch is not None:
                history[-1]["end_of_epoch"] = end_of_epoch
            return {k: v for k, v in history[-1].items() if k.startswith("eval/") and v is not None}
        started = time.perf_counter()
        stats = self.live.evaluate(
            self.drafter,
            self.heads,
            attention=self.attention,
            autocast_dtype=self.autocast_dtype,
            device=self.device,
            dist=self.dist,
        )
        metrics = {**acceptance_metrics(stats), "eval/time_s": time.perf_counter() - started}
        # JSON has no NaN (no draft at all, e.g. every prompt answered by an EOS at once): null.
        history.append(
            {
                "step": step,
                "end_of_epoch": end_of_epoch,
                **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
            }
        )
        self.sinks.log({**metrics, "epoch": self._epoch_progress()}, step)
        return metrics

    def _epoch_progress(self) -> float:
        """Epochs done, fractional (what training rows log as `epoch`)."""
        if self.state.step_in_epoch == 0:
            return float(self.state.epoch)  # (also past the last epoch, which has no plan)
        return self.state.epoch + self.state.step_in_epoch / max(len(self.epoch_plan(self.state.epoch)), 1)

    def _end_epoch(self) -> None:
        val = self.validate()
        finished_epoch = self.state.epoch
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        live = self._live_acceptance(end_of_epoch=finished_epoch)
        is_best = self.state.record_best(epoch=finished_epoch, val=val, live=live)
        if val:
            self.state.history.append({"epoch": finished_epoch, **val})
            self.sinks.log({**val, "epoch": float(finished_epoch)}, self.state.global_step)
        self.checkpointer.save_epoch(
            model=self.drafter,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            epoch=finished_epoch,
            is_best=is_best,
        )

    def _log_window(self, window: SlotStats, times: StepTimes, bar: tqdm) -> None:
        window = window.reduced(self.dist)  # every rank takes part; only rank 0's sinks write
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
                "epoch": self._epoch_progress(),
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
