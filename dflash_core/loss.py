"""DFlash's training objective per slot and its metrics: weighted CE / KL, accuracy, acceptance length.

Per-slot tensors here are shaped [..., N, B]: N blocks of B slots (slot 0 = the anchor, never
trained). Definitions follow speculators 0.9.0 as written down in testvectors/dflash/README.md
(items 9-12):

    loss = sum(per_slot * mask * w) / (sum(mask) + 1e-5)      over the whole batch

with w either exp(-(k-1)/gamma) (w_0 = 0), uniform (w_0 = 0), or D-PACE (per block, no gradient).
The denominator counts supervised slots, not sum(w): that is speculators' choice and changes the
effective learning rate, so keep it when comparing runs.

Everything stays on the device (no `.item()`): the trainer syncs when it logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LOSS_EPS = 1e-5


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: Literal["ce", "kl"] = "ce"  # hard-label CE vs the verifier's argmax, or KL(verifier || drafter)
    weighting: Literal["exp_decay", "dpace", "uniform"] = "exp_decay"
    gamma: float = 4.0  # exp-decay scale: DFlash uses 7 for block 16, 4 for block 8
    dpace_alpha: float = 0.5  # D-PACE floor: s_k = (1 - alpha) * exp(-ce_k) + alpha

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "kl"):
            raise ValueError(f"loss kind {self.kind!r}: use 'ce' or 'kl'")
        if self.weighting not in ("exp_decay", "dpace", "uniform"):
            raise ValueError(f"loss weighting {self.weighting!r}: use 'exp_decay', 'dpace' or 'uniform'")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0 (got {self.gamma})")
        if not 0.0 <= self.dpace_alpha <= 1.0:
            raise ValueError(f"dpace_alpha must be in [0, 1] (got {self.dpace_alpha})")


# ------------------------------------------------------------------------------ per-slot terms


def cross_entropy_per_slot(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unreduced CE [...] of logits [..., V] against labels [...], in float32 (bf16 CE drifts)."""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none")
    return flat.view(labels.shape)


def kl_per_slot(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_verifier || p_drafter) [...] over the same vocab (last dim), float32; target has no grad."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.detach().float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# ---------------------------------------------------------------------------------- weights


def exp_decay_weights(block_size: int, *, gamma: float, device: torch.device | None = None) -> torch.Tensor:
    """[B] float32: w_0 = 0, w_k = exp(-(k-1)/gamma) for k >= 1."""
    k = torch.arange(block_size, dtype=torch.float32, device=device)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def uniform_weights(block_size: int, *, device: torch.device | None = None) -> torch.Tensor:
    """[B] float32: 0 for the anchor slot, 1 for the drafted ones."""
    w = torch.ones(block_size, dtype=torch.float32, device=device)
    w[0] = 0.0
    return w


@torch.no_grad()
def dpace_weights(per_slot: torch.Tensor, mask: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """D-PACE weights [..., N, B] per block, without gradient, not normalised.

    q_k = exp(-ce_k * m_k); s_k = (1 - alpha) q_k + alpha where m_k else 1; P_k = prod_{i<=k} s_i;
    w_k = m_k * sum_{m>=k} P_m * m_m. A slot's weight grows with how likely the drafter is to
    still be accepted there AND at every supervised slot after it.
    """
    m = mask.float()
    q = torch.exp(-per_slot.float() * m)
    s = torch.where(mask, (1.0 - alpha) * q + alpha, torch.ones_like(q))
    P = torch.cumprod(s, dim=-1)
    tail = torch.flip(torch.cumsum(torch.flip(P * m, dims=[-1]), dim=-1), dims=[-1])
    return m * tail


def slot_weights(config: LossConfig, *, per_slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weights [..., N, B] for `config.weighting` (exp-decay/uniform broadcast over blocks)."""
    block_size = per_slot.shape[-1]
    if config.weighting == "dpace":
        return dpace_weights(per_slot, mask, alpha=config.dpace_alpha)
    if config.weighting == "exp_decay":
        w = exp_decay_weights(block_size, gamma=config.gamma, device=per_slot.device)
    else:
        w = uniform_weights(block_size, device=per_slot.device)
    return w.expand_as(per_slot)


def weighted_loss(per_slot: torch.Tensor, *, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar: sum(per_slot * mask * w) / (sum(mask) + 1e-5), float32."""
    m = mask.float()
    return (per_slot.float() * m * weights).sum() / (m.sum() + LOSS_EPS)


# ---------------------------------------------------------------------------------- metrics


@dataclass
class SlotMetrics:
    """Counts as device tensors; ratios are computed on the device too (no host sync)."""

    correct_per_pos: torch.Tensor  # [B] float: slot k supervised and correct (index 0 always 0)
    total_per_pos: torch.Tensor  # [B] float: slot k supervised
    position_acc: torch.Tensor  # [B-1]: slots 1..B-1 (0 where a slot had no supervised sample)
    full_acc_sum: torch.Tensor  # []
    full_acc_total: torch.Tensor  # []
    full_acc: torch.Tensor  # []
    accepted_len_per_block: torch.Tensor  # [..., N] float: 1 + leading run of correct AND supervised
    block_valid: torch.Tensor  # [..., N] bool: the block has at least one supervised slot
    eal_sum: torch.Tensor  # []: sum of accepted lengths over valid blocks
    eal_total: torch.Tensor  # []: number of valid blocks
    eal: torch.Tensor  # []


def slot_metrics(correct: torch.Tensor, supervised: torch.Tensor) -> SlotMetrics:
    """Accuracy per slot and vLLM-style acceptance length from bool [..., N, B] tensors.

    A masked slot ENDS the accepted run even when later slots are correct: acceptance is
    sequential, and an unsupervised slot is not known to be right (speculators' convention).
    """
    hit = (correct & supervised).flatten(0, -2).float()  # [blocks, B]
    sup = supervised.flatten(0, -2).float()
    correct_per_pos, total_per_pos = hit.sum(0), sup.sum(0)
    correct_per_pos[0] = 0.0  # slot 0 is never supervised; keep the convention explicit
    total_per_pos[0] = 0.0
    full_sum, full_total = correct_per_pos[1:].sum(), total_per_pos[1:].sum()
    accepted = (correct & supervised)[..., 1:]
    accepted_len = 1.0 + torch.cumprod(accepted.float(), dim=-1).sum(-1)  # [..., N]
    block_valid = supervised[..., 1:].any(-1)
    eal_sum = (accepted_len * block_valid).sum()
    eal_total = block_valid.sum().float()
    return SlotMetrics(
        correct_per_pos=correct_per_pos,
        total_per_pos=total_per_pos,
        position_acc=correct_per_pos[1:] / total_per_pos[1:].clamp(min=1.0),
        full_acc_sum=full_sum,
        full_acc_total=full_total,
        full_acc=full_sum / full_total.clamp(min=1.0),
        accepted_len_per_block=accepted_len,
        block_valid=block_valid,
        eal_sum=eal_sum,
        eal_total=eal_total,
        eal=eal_sum / eal_total.clamp(min=1.0),
    )
