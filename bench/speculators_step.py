"""Training-step time of the peer, speculators 0.9.0's DFlash drafter, on bench/trainer_step.py's shapes.

    python bench/speculators_step.py --out bench/results/speculators_step.json              # AdamW
    python bench/speculators_step.py --optimizer muon --out bench/results/speculators_step.json
    python bench/speculators_step.py --tiny --out /tmp/speculators_step.json               # CPU check

Drives the installed `speculators==0.9.0` package through its own classes, the way its trainer
(`speculators.train.trainer.Trainer.train_epoch`) runs one step on one GPU:

- model: `DFlashSpeculatorConfig` + `DFlashDraftModel`, configured as `speculators train
  --speculator-type dflash` builds it (`DFlashDraftModel._build_base_config_kwargs` and
  `cli.create_transformer_layer_config`, written out here because both read the verifier's
  config.json from disk): a Qwen3 decoder config with hidden 4096, 32 heads x 128, 8 KV heads,
  MLP 12288, 5 layers, vocab = draft vocab 151936 (no reduced vocab), block 16, 3 target layers
  [2, 18, 33], mask token vocab-1, `simple_flex_attention`, sample_from_anchor False. fp32 master
  weights moved to the GPU whole, as `Trainer.setup_model` does without FSDP. The frozen
  embedding, LM head and verifier LM head get random values where the package would load the
  verifier's (`load_verifier_weights`).
- inputs: one packed row as their `CollateFn` hands it over, built with the same draws from the
  same seed as bench/trainer_step.py's `synthetic_batch` (four documents of 2048/1024/3072/2048
  tokens, loss mask ~60%, random bf16 hidden states): `hidden_states` [1, T, 3*4096] (the three
  target layers concatenated), `verifier_last_hidden_states` [1, T, 4096], `input_ids`,
  `loss_mask` (int64, as their preprocessing stores it), `position_ids` (restarting per
  document), `document_ids`, `error_records`.
- step: `torch.autocast(bf16)` around `model(**batch, **train_call_kwargs)` with the kwargs of
  `DFlashDraftModel.get_trainer_kwargs` at their dflash defaults (CE loss, fused Triton kernel,
  D-PACE weights, max_anchors 512); then `zero_grad`, `loss.backward()`,
  `clip_grad_norm_(model.parameters(), 1.0)`, every optimizer of
  `speculators.train.optimizers.build_optimizers` (AdamW lr 1e-3 wd 0.01 by default; `--optimizer
  muon` = their CLI default, torch.optim.Muon on the 2D matrices + AdamW on the rest), and the
  linear warm-up scheduler step. On CUDA their `forward` is `torch.compile`d by the package itself
  (`conditional_torch_compile`), anchors are drawn inside it (`select_anchors`, on the GPU) and the
  flex BlockMask is built inside it every step (`torch.compile(create_block_mask)` over their
  `create_anchor_block_mask_mod`). Warm-up steps (which include those compiles and the Triton
  autotuning), then timed steps between CUDA events, `torch.cuda.synchronize()` after each.

Attention layout: `--layout full` (default) makes all 5 layers full attention
(`--full-attention-indices 0 1 2 3 4`), which is what our bench runs: each block sees the earlier
rows of its own document and its own 16 slots bidirectionally, the same visibility as ours.
`--layout sliding` is their CLI default instead (every layer sliding, window 2048, causal inside
the block), which sees fewer keys in long documents.

Differences in work between this step and bench/trainer_step.py's (same shapes, same FLOP count):
- Frozen vocab matrices in fp32: `embed_tokens`, `lm_head` and `verifier_lm_head` (151936 x 4096
  each, 7.5 GB together) stay fp32 on the GPU, so under autocast every step casts both LM-head
  weights (622M entries each) to bf16 before their matmuls, on top of the per-step casts of the
  trainable fp32 weights that both trainers do. Ours keeps the frozen verifier heads in bf16.
- Residual stream: theirs is fp32 (the fp32 embedding's output plus the bf16 sub-layer outputs),
  ours bf16 (the bf16 embedding); the matmuls run in bf16 in both, only elementwise traffic differs.
- Targets: they keep the verifier's full bf16 logits [8192, 151936] as the target (CE takes their
  argmax inside the fused kernel) and compute accuracy/acceptance metrics from both argmaxes; ours
  keeps only the argmax ids. Both run the verifier LM head once per row here (512 x 16 = 8192
  query tokens is not fewer than the 8192 rows).
- Loss: their fused Triton CE (forward streams the row, backward recomputes the softmax from saved
  row statistics) with D-PACE weights (their dflash default); ours is float32 `F.cross_entropy` with
  exp-decay weights (gamma 7). The weighting costs the same either way.
- Whole forward compiled by them (mask build and anchor draw excluded by `torch.compiler.disable`);
  compare with our `--compile-layers` row (each draft layer compiled) and our eager row.
- Anchors: theirs are drawn on the GPU inside the timed forward (any loss-mask row but the last 16
  of the packed row, never re-checked against documents); ours are drawn once on the CPU outside
  the timed step (the trainer draws them in its data path). 512 of them either way, every one
  valid at these shapes, so 8192 query tokens per step in both.
- Optimizer: their AdamW is `torch.optim.AdamW` with its default (foreach) kernels, ours
  `fused=True`; with `--optimizer muon` their step adds Newton-Schulz on the 36 matrices.
- Not timed here, as in ours: the host-to-device copy of the batch (their trainer copies the
  row's 256 MiB of bf16 hidden states per step with `non_blocking=True`; here the batch stays on
  the GPU) and the per-step `.item()` metric reads of their logger (`log_freq` 1).

FLOPs are counted exactly as bench/trainer_step.py counts them (docs/architecture.md), with the attention
pairs counted from their own mask_mod at one draw of their anchors, so `mfu` compares directly.

On CPU (`--tiny`; no GPU here) the package compiles nothing (`conditional_torch_compile` is
CUDA-only) and the fused loss needs Triton, so `--loss-implementation auto` picks their eager
losses there, and `--attn-impl auto` picks their `sdpa` option (torch's flex_attention has no
backward on a CPU; their `--draft-attn-impl sdpa` exists for such hardware). Their package
imports `datasets` (for `load_from_disk`, used only to read a dataset from disk, never on this
path); where it is not installed a placeholder module stands in for it so the import succeeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import torch

from bench.rows import emit_rows
from bench.step_shape import add_step_shape_arguments

PEAK_BF16_TFLOPS = 790.0  # measured dense bf16 GEMM on the H200 of this workplace (docs/benchmarks.md)
TARGET_LAYER_IDS = [2, 18, 33]  # what bench/trainer_step.py uses (Qwen3-8B: 36 layers)


def import_speculators() -> types.SimpleNamespace:
    """The speculators classes and functions this bench drives."""
    try:
        import datasets  # noqa: F401
    except ImportError:  # only `speculators.train.data`'s module-level import needs it
        stub = types.ModuleType("datasets")

        def unavailable(*_args, **_kwargs):
            raise RuntimeError("datasets is not installed (bench/speculators_step.py placeholder)")

        for name in ("load_from_disk", "load_dataset", "concatenate_datasets", "Dataset"):
            setattr(stub, name, unavailable)
        sys.modules["datasets"] = stub
    import speculators
    from speculators import SpeculatorModel, SpeculatorsConfig, VerifierConfig
    from speculators.models.dflash import DFlashDraftModel, DFlashSpeculatorConfig
    from speculators.models.dflash.attention import create_anchor_block_mask_mod
    from speculators.models.dflash.utils import select_anchors
    from speculators.proposals.greedy import GreedyTokenProposalConfig
    from speculators.train.optimizers import build_optimizers

    return types.SimpleNamespace(
        version=getattr(speculators, "__version__", None) or _dist_version("speculators"),
        SpeculatorModel=SpeculatorModel,
        SpeculatorsConfig=SpeculatorsConfig,
        VerifierConfig=VerifierConfig,
        DFlashDraftModel=DFlashDraftModel,
        DFlashSpeculatorConfig=DFlashSpeculatorConfig,
        GreedyTokenProposalConfig=GreedyTokenProposalConfig,
        create_anchor_block_mask_mod=create_anchor_block_mask_mod,
        select_anchors=select_anchors,
        build_optimizers=build_optimizers,
    )


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def build_model(spec: types.SimpleNamespace, args: argparse.Namespace):
    """DFlashDraftModel as `speculators train --speculator-type dflash` builds it, shapes from args."""
    from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

    if args.layout == "full":
        layer_types = ["full_attention"] * args.layers
    else:
        layer_types = ["sliding_attention"] * args.layers
    layer_config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, hidden_act="silu", max_position_embeddings=40960,
        initializer_range=0.02, rms_norm_eps=1e-6, head_dim=args.head_dim, tie_word_embeddings=False,
        sliding_window=args.sliding_window, use_sliding_window="sliding_attention" in layer_types,
        layer_types=layer_types,
    )  # fmt: skip
    layer_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}  # Qwen3-8B's
    layer_config._attn_implementation = args.attn_impl  # what from_training_args sets
    config = spec.DFlashSpeculatorConfig(
        transformer_layer_config=layer_config,
        draft_vocab_size=args.vocab,
        block_size=args.block_size,
        aux_hidden_state_layer_ids=TARGET_LAYER_IDS,
        mask_token_id=args.vocab - 1,
        sliding_window_non_causal=False,  # dflash default
        sample_from_anchor=False,  # dflash default
        speculators_config=spec.SpeculatorsConfig(
            algorithm="dflash",
            proposal_methods=[spec.GreedyTokenProposalConfig(speculative_tokens=args.block_size - 1)],
            default_proposal_method="greedy",
            verifier=spec.VerifierConfig(name_or_path=None, architectures=["Qwen3ForCausalLM"]),
        ),
    )
    model = spec.DFlashDraftModel(config=config)
    with torch.no_grad():  # stand-ins for the verifier weights load_verifier_weights() would read
        for weight in (model.embed_tokens.weight, model.lm_head.weight, model.verifier_lm_head.weight):
            weight.normal_(0.0, 0.02)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"parameters left uninitialised: {bad}")
    return model


def synthetic_batch(*, rows: int, hidden: int, num_aux: int, vocab: int, generator) -> dict:
    """One packed row in the layout of speculators' CollateFn, with bench/trainer_step.py's draws."""
    doc_lengths = [rows // 4, rows // 8, 3 * rows // 8]  # four packed conversations
    doc_lengths.append(rows - sum(doc_lengths))
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lengths)]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in doc_lengths]).unsqueeze(0)
    input_ids = torch.randint(0, vocab - 300, (1, rows), generator=generator)
    loss_mask = (torch.rand(1, rows, generator=generator) < 0.6).long()
    hidden_states = torch.randn(1, rows, num_aux * hidden, generator=generator).bfloat16()
    last_hidden_states = torch.randn(1, rows, hidden, generator=generator).bfloat16()
    return {
        "hidden_states": hidden_states,
        "input_ids": input_ids,
        "verifier_last_hidden_states": last_hidden_states,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "error_records": 0,
    }


@torch.no_grad()
def visible_pairs(spec: types.SimpleNamespace, model, batch: dict, max_anchors: int) -> tuple[int, int]:
    """(query, key) pairs their masks let through, summed over layers, at one draw of their anchors."""
    anchors, valid = spec.select_anchors(batch["loss_mask"], max_anchors, model.block_size)
    total_len = batch["loss_mask"].shape[1]
    device = batch["loss_mask"].device
    total = 0
    for layer in range(len(model.layers)):
        sliding = layer in model.sliding_window_indices
        mask_mod, q_len, kv_len = spec.create_anchor_block_mask_mod(
            document_ids=batch["document_ids"].squeeze(0),
            total_seq_len=total_len,
            anchor_positions=anchors,
            block_size=model.block_size,
            sliding_window=model.sliding_window if sliding else None,
            sliding_window_non_causal=model.sliding_window_non_causal,
        )
        kv = torch.arange(kv_len, device=device).unsqueeze(0)
        zero = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, q_len, 512):
            q = torch.arange(start, min(start + 512, q_len), device=device).unsqueeze(1)
            total += int(mask_mod(zero, zero, q, kv).sum())
    return total, int(valid.sum())


def model_flops(args: argparse.Namespace, *, queries: int, rows: int, visible: int) -> float:
    """FLOPs of one step, counted as bench/trainer_step.py counts them (docs/architecture.md)."""
    h, heads, kv, hd = args.hidden, args.heads, args.kv_heads, args.head_dim
    per_layer_query = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * args.intermediate
    per_layer_context = 2 * h * kv * hd
    linears = 2 * 3 * args.layers * (per_layer_query * queries + per_layer_context * rows)
    linears += 2 * 3 * len(TARGET_LAYER_IDS) * h * h * rows  # fc
    attention = 3.5 * 4 * heads * hd * visible  # `visible` is already summed over the layers
    lm_head = 2 * (2 * h * args.vocab * queries) + 2 * h * args.vocab * min(queries, rows)
    return linears + attention + lm_head


class PhaseTimer:
    """CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def phases_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


TINY = {
    "hidden": 256,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 64,
    "intermediate": 768,
    "layers": 2,
    "vocab": 2048,
    "rows": 512,
    "anchors": 32,
    "sliding_window": 128,
    "steps": 3,
    "warmup": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--layout", choices=["full", "sliding"], default="full")
    parser.add_argument("--sliding-window", type=int, default=2048)
    parser.add_argument(
        "--attn-impl",
        choices=["auto", "simple_flex_attention", "sdpa", "eager"],
        default="auto",
        help="their --draft-attn-impl; auto = simple_flex_attention (their default) on CUDA, sdpa on a CPU",
    )
    parser.add_argument("--loss-implementation", choices=["auto", "fused", "eager"], default="auto")
    parser.add_argument("--loss-weight", choices=["dpace", "fixed-exp-decay"], default="dpace")
    parser.add_argument("--gamma", type=float, default=4.0, help="their dflash_decay_gamma (exp-decay only)")
    add_step_shape_arguments(parser)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--eager",
        action="store_true",
        help="disable torch.compile (their compiled forward and mask build): a fallback, not their setup",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes that run on a CPU in seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/speculators_step.json"),
        help="Add the JSON rows to this file (a JSON array).",
    )
    args = parser.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device: the full shapes need a GPU (use --tiny on a CPU)")
    if args.eager:
        torch._dynamo.config.disable = True
    if args.attn_impl == "auto":
        args.attn_impl = "simple_flex_attention" if device.type == "cuda" else "sdpa"
    loss_impl = args.loss_implementation
    if loss_impl == "auto":
        loss_impl = "fused" if device.type == "cuda" else "eager"

    spec = import_speculators()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(spec, args)
    spec.SpeculatorModel.verify_training_compatible(model)  # Trainer.setup_model
    model.to(device)  # Trainer.setup_model, single GPU: the whole model, fp32
    model.train()

    batch = synthetic_batch(
        rows=args.rows, hidden=args.hidden, num_aux=len(TARGET_LAYER_IDS), vocab=args.vocab,
        generator=generator,
    )  # fmt: skip
    batch = {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
    train_kwargs, _ = spec.DFlashDraftModel.get_trainer_kwargs(
        loss_fn="ce",
        loss_implementation=loss_impl,
        dflash_decay_gamma=args.gamma,
        max_anchors=args.anchors,
        per_position_loss_weight=args.loss_weight,
        dpace_alpha=0.5,
    )
    total_steps = args.warmup + args.steps
    optimizer_config = types.SimpleNamespace(  # the fields build_optimizers reads, at their defaults
        optimizer=args.optimizer, lr=args.lr, weight_decay=0.01, muon_lr=args.lr, muon_momentum=0.95,
        muon_weight_decay=0.1, muon_ns_steps=5, muon_adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    optimizers = spec.build_optimizers(model, optimizer_config)
    from transformers import get_linear_schedule_with_warmup

    schedulers = [
        get_linear_schedule_with_warmup(
            opt, num_warmup_steps=total_steps // 100, num_training_steps=total_steps
        )
        for opt in optimizers
    ]

    pairs, valid_anchors = visible_pairs(spec, model, batch, args.anchors)
    queries = args.anchors * args.block_size  # every block is computed, padded or not
    flops = model_flops(args, queries=queries, rows=args.rows, visible=pairs)
    autocast_device = device.type
    losses: list[float] = []

    def step() -> list[float]:
        timer = PhaseTimer(device)
        timer.mark()
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            _draft_tokens, loss, _metrics = model(**batch, **train_kwargs)
        timer.mark()
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        timer.mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
        timer.mark()
        phases = timer.phases_ms()
        losses.append(float(loss.detach()))
        return phases

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    compile_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    forward_ms, backward_ms, optimizer_ms = (sum(t[i] for t in times) / len(times) for i in range(3))
    step_ms = forward_ms + backward_ms + optimizer_ms
    tflops = flops / (step_ms / 1e3) / 1e12
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_text = {
        "adamw": "AdamW (torch default foreach)",
        "muon": "Muon on 2D matrices + AdamW (their CLI default)",
    }[args.optimizer]
    layout_text = (
        "full attention layers"
        if args.layout == "full"
        else f"sliding layers (window {args.sliding_window}, causal in block)"
    )
    if args.eager:
        compile_text = "eager (torch.compile disabled)"
    elif device.type == "cuda":
        compile_text = "their compiled forward"
    else:
        compile_text = "eager (the package compiles on CUDA only)"
    config_text = (
        f"speculators {spec.version} DFlashDraftModel hidden {args.hidden} vocab {args.vocab}, "
        f"{args.layers} layers ({params / 1e9:.3f} B trainable), block {args.block_size} x {args.anchors} "
        f"anchors, row {args.rows}, {layout_text}, {args.attn_impl}, "
        f"{compile_text}, "
        f"{loss_impl} CE + {args.loss_weight}, bf16 autocast over fp32 master weights, {optimizer_text}"
    )
    results = {
        "step_time_ms": (step_ms, "ms"),
        "forward_ms": (forward_ms, "ms"),
        "backward_ms": (backward_ms, "ms"),
        "optimizer_ms": (optimizer_ms, "ms"),
        "tokens_per_s": (args.rows / (step_ms / 1e3), "row tokens/s (their trainer's tokens_per_s)"),
        "query_tokens_per_s": (queries / (step_ms / 1e3), "tokens/s"),
        "model_tflops_per_step": (flops / 1e12, "TFLOP"),
        "achieved_tflops": (tflops, "TFLOP/s"),
        "mfu": (tflops / PEAK_BF16_TFLOPS, "fraction of 790 TFLOP/s"),
        "warmup_and_compile_s": (compile_s, "s"),
        "valid_anchors": (valid_anchors, "anchors"),
        "loss_last_step": (losses[-1], "loss"),
    }
    if device.type == "cuda":
        results["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30, "GiB")
    else:
        import resource

        results["peak_rss_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB")
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit_rows(results, config=config_text, device=device_name, out=args.out)


if __name__ == "__main__":
    main()
