"""Data-parallel training across processes: torchrun's environment, FSDP2 sharding, collectives.

One process per GPU (or per CPU rank with gloo, for tests). `init_distributed` reads torchrun's
RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process and every collective
here is a no-op, so the single-process trainer pays nothing.

Sharding (`shard_drafter`): FSDP2's `fully_shard` on every decoder layer, then on the root, so
one layer's parameters are gathered at a time. Master weights and optimizer state stay float32;
on CUDA the layers compute in bf16 (`MixedPrecisionPolicy`) and gradients are reduced in float32.

Checkpoints hold full (unsharded) tensors keyed by parameter name, written by rank 0. That makes
them independent of the number of ranks: a run saved on 2 GPUs resumes on 1 or 4.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def any(self, flags: list[bool], *, device: torch.device) -> list[bool]:
        """For each flag: is it set on at least one rank? One small all-reduce (a host sync)."""
        if not self.is_distributed:
            return flags
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (returns `tensor`)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small picklable things: paths, training state)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def init_distributed(device_name: str, *, timeout_s: float) -> tuple[DistContext, torch.device]:
    """(context, this rank's device). Starts the process group when launched by torchrun.

    `timeout_s` bounds how long a rank waits in a collective for the others (e.g. while one of
    them waits for a hidden-state service); it must exceed the service deadline.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(), _device(device_name, local_rank=None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_name, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    context = DistContext(rank=rank, world_size=world_size, local_rank=local_rank)
    logger.info("rank %d of %d on %s (%s)", rank, world_size, device, dist.get_backend())
    return context, device


def _device(name: str, *, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def shutdown_distributed(*, finished: bool) -> None:
    """End the process group; after a normal end, first wait for every rank in a barrier.

    The barrier lets gloo's worker threads free the finished collectives (which takes the GIL)
    while the interpreter is whole; a free that lands in interpreter shutdown aborts the rank, so
    a torchrun rank also ends without that shutdown (`services/cli/train.py`, `exit_rank`). Never
    after an error: a rank that failed may never arrive, and the barrier would hang.
    """
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def shard_drafter(drafter: torch.nn.Module, *, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: each decoder layer is its own unit, the root holds the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype is not None else None
    )
    for layer in drafter.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(drafter, mp_policy=policy)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on CPU, keyed by parameter name.

    Collective when distributed (every rank must call it); only rank 0 gets the tensors.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict,
    optimizer_state: dict | None,
    *,
    context: DistContext,
) -> None:
    """Inverse of `full_state`: rank 0 passes the loaded dicts, the others receive them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=context.is_distributed, strict=True)
    set_model_state_dict(model, model_state, options=options)
    has_optimizer = context.broadcast_object(optimizer_state is not None)
    if has_optimizer:
        set_optimizer_state_dict(model, optimizer, optimizer_state or {}, options=options)
