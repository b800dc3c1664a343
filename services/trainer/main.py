"""Trainer entry: build every part from a `TrainConfig`, preflight, train, tear down.

    dflash train --verifier-name-or-path M --data-path DATA --save-path CKPTS [flags]
    python -m services.trainer.main --config job.yaml

`run_training(config)` is what the CLI (and later the control plane's executors) call.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from dflash_core.checkpoint import find_resume_point, load_checkpoint
from dflash_core.config import TrainConfig
from dflash_core.data.prepare import load_prepared
from dflash_core.evaluation import eos_token_ids
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.verifier import (
    VerifierFingerprint,
    fingerprint_of,
    load_tokenizer,
    load_verifier,
    load_verifier_config,
    load_verifier_heads,
    load_verifier_heads_from_model,
)
from services.trainer.batches import BatchBuilder, TokenRows
from services.trainer.cache import CachingSource, HiddenStateCache
from services.trainer.checkpointing import Checkpointer, DataPlanInputs
from services.trainer.data import split_indices
from services.trainer.distributed import DistContext, init_distributed, shard_drafter, shutdown_distributed
from services.trainer.drafter_setup import build_drafter_config, init_reduced_vocab
from services.trainer.grpc_source import GrpcSource
from services.trainer.live_eval import build_live_acceptance, load_generation_config
from services.trainer.metrics import build_metric_sinks, check_backends_installed
from services.trainer.preflight import check_data_matches_verifier
from services.trainer.sources import HiddenStateSource, InProcessSource
from services.trainer.stop_signals import StopSignals
from services.trainer.train_state import TrainState
from services.trainer.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    save_path: Path
    state: TrainState


def resolve_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None = plain float32. bf16 runs as autocast over float32 master weights."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_source(
    config: TrainConfig,
    *,
    model: torch.nn.Module | None,
    fingerprint: VerifierFingerprint,
    target_layer_ids: list[int],
) -> CachingSource:
    """The verifier's hidden states behind the cache, as --on-missing/--on-generate say.

    Misses are computed by the hidden-state service when --hidden-states-endpoint names one, else by the
    verifier in this process. The cache is always consulted (`generate` means "compute what is
    not cached"); the computing side is only wired in when misses are computed, so
    `--on-missing raise` never needs a verifier or a service.
    """
    cache = HiddenStateCache(
        config.hidden_states_cache or Path(config.data_path) / "hidden_states",
        fingerprint=fingerprint,
        target_layer_ids=target_layer_ids,
    )
    inner: HiddenStateSource | None = None
    if config.on_missing == "generate":
        if config.hidden_states_endpoint:
            inner = GrpcSource.from_config(config, target_layer_ids=target_layer_ids, expected=fingerprint)
        else:
            assert model is not None, "computing hidden states in-process needs the verifier"
            inner = InProcessSource(model=model, fingerprint=fingerprint, target_layer_ids=target_layer_ids)
    logger.info(
        "hidden states: %s, cache %s, on missing %s, on generate %s",
        f"service {', '.join(config.hidden_states_endpoint)}"
        if config.hidden_states_endpoint
        else "in-process verifier",
        cache.folder,
        config.on_missing,
        config.on_generate,
    )
    return CachingSource(inner, cache=cache, on_missing=config.on_missing, on_generate=config.on_generate)


def load_verifier_side(
    config: TrainConfig, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module | None, PretrainedConfig, PreTrainedTokenizerBase, VerifierHeads]:
    """(model or None, its config, tokenizer, heads). With a hidden-state service the decoder layers
    run there, so only the config, tokenizer and the three head tensors are loaded here. Without
    one, the verifier runs here when misses are computed or live acceptance needs it."""
    name = config.verifier_name_or_path
    needs_model = config.on_missing == "generate" or bool(config.eval_every)
    if config.hidden_states_endpoint or not needs_model:
        tokenizer = load_tokenizer(name)
        verifier_config = load_verifier_config(name)
        return None, verifier_config, tokenizer, load_verifier_heads(name, device=device, dtype=dtype)
    model, tokenizer = load_verifier(name, device=device, dtype=dtype)
    return model, model.config, tokenizer, load_verifier_heads_from_model(model).to(device)


def run_training(config: TrainConfig, *, stop_after_steps: int | None = None) -> TrainResult:
    """Train to the end of `config` (or for `stop_after_steps` more steps). Resumes from `latest`.

    Under torchrun every rank runs this; the process group lives for the call.
    """
    check_backends_installed(list(config.report_to))  # before anything heavy is loaded
    # A rank waits in a collective while another waits for the hidden-state service: allow that.
    dist, device = init_distributed(config.device, timeout_s=max(600.0, 2 * config.service_timeout_s + 60))
    finished = False
    try:
        result = _train(config, dist=dist, device=device, stop_after_steps=stop_after_steps)
        finished = True
        return result
    finally:
        shutdown_distributed(finished=finished)


def _train(
    config: TrainConfig, *, dist: DistContext, device: torch.device, stop_after_steps: int | None
) -> TrainResult:
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the INFO lines, from rank 0
    autocast_dtype = resolve_autocast_dtype(config.dtype, device)
    seed_everything(config.seed)  # the same initial weights on every rank, before sharding

    # --- data and verifier: refuse to start on any mismatch (docs/architecture.md) ---
    dataset, data_meta = load_prepared(config.data_path)
    # The frozen verifier runs in the compute dtype: hidden states travel as bf16 anyway (the wire).
    verifier_dtype = autocast_dtype or torch.float32
    model, verifier_config, tokenizer, heads = load_verifier_side(config, device=device, dtype=verifier_dtype)
    fingerprint = fingerprint_of(verifier_config, tokenizer, name_or_path=config.verifier_name_or_path)
    check_data_matches_verifier(data_meta, fingerprint, data_path=config.data_path)
    drafter_config = build_drafter_config(config, verifier_config=verifier_config, tokenizer=tokenizer)
    source = build_source(
        config,
        model=model,
        fingerprint=fingerprint,
        target_layer_ids=drafter_config.aux_hidden_state_layer_ids,
    )

    # --- model, optimizer, schedule ---
    drafter = DFlashDrafter(drafter_config)
    if drafter_config.has_reduced_vocab:
        init_reduced_vocab(drafter, heads=heads, data_path=config.data_path)
    if config.from_pretrained is not None:
        loaded = load_checkpoint(config.from_pretrained, map_location="cpu")
        drafter.load_state_dict(loaded.state_dict, strict=True)
        logger.info("initialised drafter weights from %s", config.from_pretrained)
    drafter.to(device)
    if config.compile and device.type == "cuda":
        drafter.compile_layers()
    if dist.is_distributed:
        shard_drafter(drafter, compute_dtype=autocast_dtype if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(
        [p for p in drafter.parameters() if p.requires_grad],
        lr=config.lr,
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
    )

    rows = TokenRows(dataset, max_length=config.total_seq_len)
    train_indices, val_indices = split_indices(len(rows), val_fraction=config.val_fraction, seed=config.seed)
    live = build_live_acceptance(
        config,
        rows=rows,
        val_indices=val_indices,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(
            tokenizer,
            verifier_config,
            model.generation_config
            if model is not None
            else load_generation_config(config.verifier_name_or_path),
        ),
        model=model,
        fingerprint=fingerprint,
        target_layer_ids=drafter_config.aux_hidden_state_layer_ids,
        dist=dist,
    )
    checkpointer = Checkpointer(
        root=config.save_path,
        drafter_config=drafter_config,
        data_plan=DataPlanInputs(
            seed=config.seed,
            num_train_rows=len(train_indices),
            num_val_rows=len(val_indices),
            total_seq_len=config.total_seq_len,
            global_batch_size=config.batch_size * dist.world_size,
        ),
        dist=dist,
        save_best=config.save_best,
    )
    sinks = build_metric_sinks(config, rank=dist.rank)
    stop = StopSignals()
    trainer = Trainer(
        config=config,
        drafter=drafter,
        heads=heads,
        batches=BatchBuilder(
            rows=rows,
            source=source,
            total_seq_len=config.total_seq_len,
            device=device,
            hidden_dtype=autocast_dtype or torch.float32,
        ),
        train_indices=train_indices,
        val_indices=val_indices,
        optimizer=optimizer,
        checkpointer=checkpointer,
        sinks=sinks,
        state=TrainState(best_metric=config.best_metric),
        autocast_dtype=autocast_dtype,
        dist=dist,
        stop=stop,
        live=live,
    )
    resume_from = dist.broadcast_object(find_resume_point(config.save_path) if config.resume else None)
    if resume_from is not None:
        checkpointer.restore(
            resume_from,
            model=drafter,
            optimizer=optimizer,
            scheduler=trainer.scheduler,
            state=trainer.state,
        )
    logger.info(
        "training %s: %d train / %d val rows, %d steps/epoch, %d epochs, %s%s",
        drafter_config.verifier_name_or_path,
        len(train_indices),
        len(val_indices),
        len(trainer.epoch_plan(0)),
        config.epochs,
        f"{dist.world_size} ranks (FSDP2), {device.type}" if dist.is_distributed else f"device {device}",
        f", resumed from {resume_from}" if resume_from else "",
    )
    try:
        with stop:
            state = trainer.train(stop_after_steps=stop_after_steps)
        counters = source.counters
        sinks.log(counters.as_metrics(), state.global_step)
        logger.info(
            "hidden states: %d from the cache, %d computed, %d dropped",
            counters.hits,
            counters.generated,
            counters.dropped,
        )
    finally:
        sinks.close()
        source.close()
    return TrainResult(save_path=Path(config.save_path), state=state)
