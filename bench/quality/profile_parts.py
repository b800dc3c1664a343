"""Where the quality run's time goes, at SmolLM2-135M shape, with random weights (no GGUF needed).

    python bench/quality/profile_parts.py --out DIR            # one H200, ~5 minutes
    python bench/quality/profile_parts.py --tiny --out DIR     # CPU, tiny shapes: the code path only

The first quality run on the H200 spent its 9-minute command on a 3.5-minute regeneration
(~8 000 new tokens/s at batch 4 096), ~3 minutes of trainer start-up and 0.30 s per optimizer
step with both drafters on the GPU. Speed does not depend on the weights' values, so this
measures each part on a random Llama of SmolLM2-135M-Instruct's shape (30 layers, width 576,
9/3 heads of 64, MLP 1536, vocab 49 152, tied embeddings) and random token rows of the length the
regenerated chitchat replies have:

1. `generate` (greedy, bf16, left-padded, the quality run's `batched_complete`): new tokens/s at
   several batch sizes (random weights never emit EOS: every row runs to max_new_tokens).
2. `run_training` (the code `dflash train` runs, verifier in-process): start-up (until the first
   step), steady seconds per step and its phases (fetch, forward, backward), one drafter alone and
   two (block 8 and 16) side by side on the one GPU, as the quality run trains them.

Rows go to `<out>/quality_profile.json` (bench/rows.py format).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOLLM2_SHAPE = dict(
    arch="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
TINY_SHAPE = dict(arch="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", type=Path, required=True)
    add("--tiny", action="store_true", help="Tiny shapes and counts: the code path on a CPU.")
    add("--generate-batches", type=int, nargs="+", default=[1024, 4096])
    add(
        "--generate-caches",
        nargs="+",
        choices=["dynamic", "static"],
        default=["dynamic"],
        help="transformers' cache_implementation for generate (rows of static: suffix _static).",
    )
    add("--prompt-tokens", type=int, default=64)
    add("--new-tokens", type=int, default=128)
    add("--rows", type=int, default=12000, help="Prepared rows (samples) of random tokens.")
    add("--steps", type=int, default=150, help="Optimizer steps per training run.")
    add("--total-seq-len", type=int, default=8192)
    add("--query-tokens", type=int, default=16384)
    add("--cprofile", action="store_true", help="Only one block-8 run, in this process, under cProfile.")
    add(
        "--parts",
        nargs="+",
        choices=["generate", "alone", "pair"],
        default=["generate", "alone", "pair"],
        help="What to measure: generate, one drafter training alone, two at once.",
    )
    args = parser.parse_args()
    if args.tiny:
        args.generate_batches, args.prompt_tokens, args.new_tokens = [4, 8], 8, 8
        args.rows, args.steps, args.total_seq_len, args.query_tokens = 64, 12, 512, 256
    return args


def make_workspace(root: Path, *, args: argparse.Namespace) -> dict[str, Path]:
    """A random verifier of the chosen shape and prepared rows of random tokens (~180 each)."""
    from dflash_core.config import PrepareDataConfig
    from dflash_core.data.prepare import prepare_data
    from dflash_core.verifier import tokenizer_fingerprint
    from tests.factories.verifiers import make_tiny_verifier

    shape = TINY_SHAPE if args.tiny else SMOLLM2_SHAPE
    verifier = make_tiny_verifier(root / "verifier", **shape)
    tokenizer = verifier.tokenizer
    rng = random.Random(0)
    rows = []
    for _ in range(args.rows):
        prompt, reply = rng.randint(30, 80), rng.randint(40, 192)
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(prompt + reply)]
        rows.append(json.dumps({"input_ids": ids, "loss_mask": [0] * prompt + [1] * reply}))
    source = root / "rows.jsonl"
    source.write_text("\n".join(rows) + "\n")
    data = root / "data"
    prepare_data(
        PrepareDataConfig(model=str(verifier.path), data=[str(source)], output=data, seq_length=2048),
        tokenizer=tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=int(verifier.model.config.vocab_size),
    )
    return {"root": root, "verifier": verifier.path, "data": data}


def profile_generate(
    workspace: dict[str, Path], *, args: argparse.Namespace, device: str
) -> dict[str, float]:
    import torch

    from bench.quality.data import batched_complete
    from dflash_core.verifier import load_verifier

    model, _ = load_verifier(
        str(workspace["verifier"]), device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32
    )
    rng = random.Random(1)
    out = {}
    for cache, batch in itertools.product(args.generate_caches, args.generate_batches):
        prompts = [[rng.randrange(3, 200) for _ in range(args.prompt_tokens)] for _ in range(batch)]
        complete = batched_complete(
            model,
            stop_ids=[],
            pad_id=0,
            max_new_tokens=args.new_tokens,
            max_batch=batch,
            max_batch_tokens=1 << 30,
            cache=cache,
        )
        started = time.perf_counter()
        replies = complete(prompts)
        seconds = time.perf_counter() - started
        name = f"batch{batch}" + ("" if cache == "dynamic" else f"_{cache}")
        out[f"generate_tokens_per_s_{name}"] = sum(len(r) for r in replies) / seconds
        out[f"generate_step_ms_{name}"] = 1e3 * seconds / args.new_tokens
        print(f"generate {name}: {out[f'generate_tokens_per_s_{name}']:.0f} new tokens/s", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def train_once(spec: dict[str, Any]) -> None:
    """A spawned process: one `run_training` of `spec["config"]`; timings to spec["result"]."""
    started = time.time()
    from dflash_core.config import TrainConfig
    from services.trainer.main import run_training

    config = TrainConfig(**spec["config"])
    run_training(config)
    rows = [json.loads(line) for line in (config.save_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    steady = train[len(train) // 2 :]  # the second half: compilation and warm-up are over
    first = min(r["time"] for r in rows)
    pace = (steady[-1]["time"] - steady[0]["time"]) / max(1, steady[-1]["step"] - steady[0]["step"])

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in steady) / len(steady)

    Path(spec["result"]).write_text(
        json.dumps(
            {
                "startup_s": first - started,
                "first_log_to_half_s": steady[0]["time"] - first,
                "step_s": pace,
                "fetch_s": mean("time/fetch_s"),
                "forward_s": mean("time/forward_s"),
                "backward_s": mean("time/backward_s"),
                "data_wait_frac": mean("train/data_wait_frac"),
                "wall_s": time.time() - started,
            }
        )
    )


def profile_training(
    workspace: dict[str, Path], *, args: argparse.Namespace, device: str, blocks: list[int]
) -> dict[str, float]:
    context = mp.get_context("spawn")
    specs = training_specs(workspace, args=args, device=device, blocks=blocks)
    processes = []
    for spec in specs:
        processes.append(context.Process(target=train_once, args=(spec,)))
        processes[-1].start()
    for process in processes:
        process.join()
    out = {}
    for block, spec in zip(blocks, specs, strict=True):
        if not Path(spec["result"]).is_file():
            print(f"training block {block} ({len(blocks)} at once): FAILED", flush=True)
            continue
        result = json.loads(Path(spec["result"]).read_text())
        tag = f"block{block}_{'alone' if len(blocks) == 1 else f'{len(blocks)}_at_once'}"
        for key, value in result.items():
            out[f"train_{key}_{tag}"] = value
        print(f"training {tag}: {json.dumps({k: round(v, 4) for k, v in result.items()})}", flush=True)
    return out


def training_specs(
    workspace: dict[str, Path], *, args: argparse.Namespace, device: str, blocks: list[int]
) -> list[dict[str, Any]]:
    specs = []
    for block in blocks:
        save = workspace["root"] / f"train-b{block}-of{len(blocks)}"
        config = dict(
            verifier_name_or_path=str(workspace["verifier"]), data_path=str(workspace["data"]),
            save_path=str(save), block_size=block, max_anchors=max(1, args.query_tokens // block),
            total_seq_len=args.total_seq_len, num_layers=1 if args.tiny else 5, max_steps=args.steps,
            epochs=50, log_freq=10, val_fraction=0.01, report_to=["jsonl"], device=device, compile=False,
            target_layer_ids=[1, 2, 3] if args.tiny else [2, 8, 15, 21, 28], mask_token_id=0, resume=False,
        )  # fmt: skip
        specs.append({"config": config, "result": str(save) + ".json"})
    return specs


def profile_calls(workspace: dict[str, Path], *, args: argparse.Namespace, device: str) -> int:
    """One block-8 training run in this process under cProfile: where the host time goes."""
    import cProfile
    import pstats

    spec = training_specs(workspace, args=args, device=device, blocks=[8])[0]
    profiler = cProfile.Profile()
    profiler.enable()
    train_once(spec)
    profiler.disable()
    profiler.dump_stats(str(args.out / "train_block8.prof"))
    print(Path(spec["result"]).read_text())
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    return 0


def main() -> int:
    import torch

    from bench.rows import emit_rows

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dflash_profile_") as tmp:
        started = time.time()
        workspace = make_workspace(Path(tmp), args=args)
        if args.cprofile:
            return profile_calls(workspace, args=args, device=device)
        figures["workspace_s"] = time.time() - started
        if "generate" in args.parts:
            figures.update(profile_generate(workspace, args=args, device=device))
        if "alone" in args.parts:
            figures.update(profile_training(workspace, args=args, device=device, blocks=[8]))
        if "pair" in args.parts:
            figures.update(profile_training(workspace, args=args, device=device, blocks=[8, 16]))
    config = (
        f"random Llama at {'tiny' if args.tiny else 'SmolLM2-135M'} shape, bf16 on {device}; generate: "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens; training: run_training, verifier "
        f"in-process, 5 layers, rows of {args.total_seq_len}, {args.query_tokens} query tokens, {args.steps} "
        f"steps, sdpa on CPU / flex on CUDA, layers not compiled, random rows of 70-270 tokens"
    )
    units = {"tokens_per_s": "tokens/s", "_ms": "ms", "frac": "fraction", "_s": "s"}  # first match wins
    emit_rows(
        {k: (float(v), next((u for s, u in units.items() if s in k), "")) for k, v in figures.items()},
        config=config,
        device=label,
        out=args.out / "quality_profile.json",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
