"""Accumulates the objective's per-step counts on the device; syncs to the host only in `summary`.

Accuracy and acceptance are ratios of counts summed over the window (not means of per-step
ratios), so a step with few supervised slots weighs what it should.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.trainer.distributed import DistContext


@dataclass
class SlotStats:
    loss_sum: torch.Tensor  # sum of per-step losses
    correct_per_pos: torch.Tensor  # [B] slot k correct and supervised
    total_per_pos: torch.Tensor  # [B] slot k supervised
    eal_sum: torch.Tensor
    eal_total: torch.Tensor
    grad_norm_sum: torch.Tensor
    steps: int = 0
    tokens: int = 0
    samples: int = 0

    @classmethod
    def empty(cls, block_size: int, device: torch.device) -> SlotStats:
        zero = torch.zeros((), device=device)
        return cls(
            loss_sum=zero.clone(),
            correct_per_pos=torch.zeros(block_size, device=device),
            total_per_pos=torch.zeros(block_size, device=device),
            eal_sum=zero.clone(),
            eal_total=zero.clone(),
            grad_norm_sum=zero.clone(),
        )

    def add(
        self, out, *, loss: torch.Tensor, grad_norm: torch.Tensor | None, tokens: int, samples: int
    ) -> None:
        """`loss`: this rank's share of the step's loss (the whole loss on one rank)."""
        self.loss_sum += loss.detach().float()
        self.correct_per_pos += out.correct_per_pos.float()
        self.total_per_pos += out.total_per_pos.float()
        self.eal_sum += out.eal_sum.float()
        self.eal_total += out.eal_total.float()
        if grad_norm is not None:
            self.grad_norm_sum += grad_norm.float()
        self.steps += 1
        self.tokens += tokens
        self.samples += samples

    def reduced(self, dist: DistContext) -> SlotStats:
        """Sums over ranks (loss shares, counts, tokens); `steps` is per rank and stays as it is."""
        if not dist.is_distributed:
            return self
        scalars = torch.stack(
            [
                self.loss_sum,
                self.eal_sum,
                self.eal_total,
                self.grad_norm_sum,
                torch.tensor(float(self.tokens), device=self.loss_sum.device),
                torch.tensor(float(self.samples), device=self.loss_sum.device),
            ]
        )
        packed = dist.sum_(torch.cat([scalars, self.correct_per_pos, self.total_per_pos]))
        block = self.correct_per_pos.numel()
        loss_sum, eal_sum, eal_total, grad_norm_sum, tokens, samples = packed[:6]
        return SlotStats(
            loss_sum=loss_sum,
            correct_per_pos=packed[6 : 6 + block],
            total_per_pos=packed[6 + block :],
            eal_sum=eal_sum,
            eal_total=eal_total,
            grad_norm_sum=grad_norm_sum,
            steps=self.steps,
            tokens=int(tokens),
            samples=int(samples),
        )

    def summary(self, prefix: str) -> dict[str, float]:
        steps = max(self.steps, 1)
        correct = self.correct_per_pos.cpu()  # host sync
        total = self.total_per_pos.cpu()
        metrics = {
            f"{prefix}loss": float(self.loss_sum) / steps,
            f"{prefix}acc": float(correct[1:].sum() / total[1:].sum().clamp(min=1)),
            f"{prefix}eal": float(self.eal_sum / self.eal_total.clamp(min=1)),
            f"{prefix}supervised_slots": float(total.sum()),
        }
        if prefix == "train/":
            metrics[f"{prefix}grad_norm"] = float(self.grad_norm_sum) / steps
        for k in range(1, correct.numel()):
            metrics[f"{prefix}acc_slot_{k}"] = float(correct[k] / total[k].clamp(min=1))
        return metrics
