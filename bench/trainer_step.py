"""Training-step throughput of the DFlash drafter at Qwen3-8B shape, with model FLOPs utilisation.

    python bench/trainer_step.py --attention flex --steps 10 --out bench/results/trainer_step_h200.json

Shape (the peer's published setting): verifier hidden 4096, vocab 151936, 5 draft layers
(32 heads x 128, 8 KV heads, MLP 12288), 3 aux layers, block 16 x 512 anchors = 8192 query
tokens per step, one packed row of 8192 tokens. Random weights and hidden states: speed does not
depend on their values. bf16 autocast over fp32 master weights, fused AdamW.

FLOPs are counted as docs/architecture.md says, so figures compare with the peer's:
  trainable linears x 3 over the query tokens (+ fc and the context k/v projections over the row),
  attention x 3.5 over the key/query pairs the mask lets through,
  the frozen LM head forward + input-gradient backward over the query tokens (2 x its forward),
  the verifier-target LM head forward over min(query tokens, row tokens).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench.rows import emit_rows
from bench.step_shape import add_step_shape_arguments
from dflash_core.anchors import sample_anchors
from dflash_core.batch import PackedBatch
from dflash_core.loss import LossConfig
from dflash_core.masks import BlockVisibility, dense_mask
from dflash_core.model.config import DrafterConfig
from dflash_core.model.drafter import DFlashDrafter
from dflash_core.model.verifier_heads import VerifierHeads
from dflash_core.objective import dflash_forward
from services.trainer.distributed import shard_drafter

PEAK_BF16_TFLOPS = 790.0  # measured dense bf16 GEMM on the H200 of this workplace (docs/benchmarks.md)


def drafter_config(args: argparse.Namespace) -> DrafterConfig:
    return DrafterConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        rope_theta=1e6, max_position_embeddings=40960, block_size=args.block_size,
        aux_hidden_state_layer_ids=[2, 18, 33], mask_token_id=args.vocab - 1, vocab_size=args.vocab,
        draft_vocab_size=args.vocab,
    )  # fmt: skip


def model_flops(config: DrafterConfig, *, queries: int, rows: int, visible_pairs: int) -> float:
    """FLOPs of one training step, counted as docs/architecture.md says (see the module docstring)."""
    h, heads, kv, hd = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    per_layer_query = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * config.intermediate_size
    per_layer_context = 2 * h * kv * hd
    linears = 2 * 3 * (config.num_hidden_layers * (per_layer_query * queries + per_layer_context * rows))
    linears += 2 * 3 * config.num_aux_layers * h * h * rows  # fc
    attention = 3.5 * config.num_hidden_layers * 4 * heads * hd * visible_pairs
    lm_head = 2 * (2 * h * config.vocab_size * queries) + 2 * h * config.vocab_size * min(queries, rows)
    return linears + attention + lm_head


def synthetic_batch(*, rows: int, hidden: int, num_aux: int, vocab: int, generator) -> PackedBatch:
    doc_lengths = [rows // 4, rows // 8, 3 * rows // 8]  # four packed conversations
    doc_lengths.append(rows - sum(doc_lengths))
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lengths)]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths]).unsqueeze(0)
    return PackedBatch(
        input_ids=torch.randint(0, vocab - 300, (1, rows), generator=generator),
        loss_mask=torch.rand(1, rows, generator=generator) < 0.6,
        document_ids=document_ids,
        position_ids=position_ids,
        aux_hidden_states=torch.randn(1, rows, num_aux * hidden, generator=generator).bfloat16(),
        last_hidden_states=torch.randn(1, rows, hidden, generator=generator).bfloat16(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=["flex", "sdpa"], default="flex")
    add_step_shape_arguments(parser)
    parser.add_argument(
        "--compile-layers", action="store_true", help="torch.compile each draft layer (the trainer's default)"
    )
    parser.add_argument(
        "--fsdp", action="store_true", help="shard with FSDP2 as `dflash train` does under torchrun (1 rank)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=None, help="Add the JSON rows to this file (a JSON array)."
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    config = drafter_config(args)
    drafter = DFlashDrafter(config).to(device)
    drafter.reset_parameters()
    if args.fsdp:  # a 1-rank process group: the FSDP2 code path (bf16 params, fp32 reduce) on one GPU
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        shard_drafter(drafter, compute_dtype=torch.bfloat16)
    heads = VerifierHeads(vocab_size=config.vocab_size, hidden_size=config.hidden_size, eps=1e-6)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.02)
    heads = heads.to(device, torch.bfloat16)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-4, fused=True)
    batch = synthetic_batch(
        rows=args.rows,
        hidden=config.hidden_size,
        num_aux=config.num_aux_layers,
        vocab=config.vocab_size,
        generator=generator,
    ).to(device)
    anchors, valid = sample_anchors(
        batch.loss_mask.cpu(),
        batch.document_ids.cpu(),
        max_anchors=args.anchors,
        generator=generator,
        pad_to_max=True,
    )
    anchors, valid = anchors.to(device), valid.to(device)
    visibility = BlockVisibility(
        anchors=anchors,
        anchor_valid=valid,
        document_ids=batch.document_ids,
        block_size=args.block_size,
    )
    visible_pairs = int(dense_mask(visibility).sum())
    queries = int(valid.sum()) * args.block_size
    flops = model_flops(config, queries=queries, rows=args.rows, visible_pairs=visible_pairs)
    loss_config = LossConfig(gamma=7.0 if args.block_size == 16 else 4.0)

    @torch.no_grad()
    def forward_loss() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = dflash_forward(
                drafter, heads, batch, anchors=anchors, anchor_valid=valid,
                loss_config=loss_config, attention=args.attention,
            )  # fmt: skip
        return float(out.loss)

    checks = {}
    if args.compile_layers:  # the compiled layers must compute what the eager ones do
        eager = forward_loss()
        drafter.compile_layers()
        checks["compiled_vs_eager_loss_rel_diff"] = (abs(forward_loss() - eager) / abs(eager), "relative")

    def step() -> dict[str, float]:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = dflash_forward(
                drafter, heads, batch, anchors=anchors, anchor_valid=valid,
                loss_config=loss_config, attention=args.attention,
            )  # fmt: skip
        events[1].record()
        out.loss.backward()
        events[2].record()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events[3].record()
        torch.cuda.synchronize()
        names = ("forward", "backward", "optimizer")
        return {n: events[i].elapsed_time(events[i + 1]) for i, n in enumerate(names)}

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    compile_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    mean = {k: sum(t[k] for t in times) / len(times) for k in times[0]}
    step_ms = sum(mean.values())
    tflops = flops / (step_ms / 1e3) / 1e12
    params = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
    config_text = (
        f"drafter hidden {args.hidden} vocab {args.vocab}, {args.layers} layers ({params / 1e9:.3f} B "
        f"trainable), block {args.block_size} x {args.anchors} anchors, row {args.rows}, {args.attention}"
        f"{', compiled layers' if args.compile_layers else ''}{', FSDP2 (1 rank)' if args.fsdp else ''}, "
        "bf16 autocast, fused AdamW"
    )
    results = {
        "step_time_ms": (step_ms, "ms"),
        "forward_ms": (mean["forward"], "ms"),
        "backward_ms": (mean["backward"], "ms"),
        "optimizer_ms": (mean["optimizer"], "ms"),
        "query_tokens_per_s": (queries / (step_ms / 1e3), "tokens/s"),
        "model_tflops_per_step": (flops / 1e12, "TFLOP"),
        "achieved_tflops": (tflops, "TFLOP/s"),
        "mfu": (tflops / PEAK_BF16_TFLOPS, "fraction of 790 TFLOP/s"),
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30, "GiB"),
        "warmup_and_compile_s": (compile_s, "s"),
        **checks,
    }
    device_name = torch.cuda.get_device_name()
    emit_rows(results, config=config_text, device=device_name, out=args.out)


if __name__ == "__main__":
    main()
