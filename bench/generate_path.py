"""The Generate path's ceiling: client -> gRPC -> servicer -> scheduler -> stream, with an engine that
costs nothing (`bench/synthetic_generation.py`), so what is measured is everything around vLLM.

    python bench/generate_path.py --out bench/results         # 2 048 and 8 192 prompts, 0 and 8 ms steps
    python bench/generate_path.py --step-ms 8 --frontend-us-per-seq 1 --add-us 270   # + vLLM's front end
    python bench/generate_path.py --prompts 2048 --step-ms 0 --profile          # where the time goes
    python bench/generate_path.py --vllm FOLDER --out "$OUT"  # the real engine (GPU or vLLM's CPU build)

A real `HiddenStateServer` on 127.0.0.1 (port 0) serves the synthetic backend (generation only,
reported as vLLM) in a child process, as `serve-hidden-states` runs apart from prepare-data; this
process drives it with a real `GenerateClient.complete` as bench/regeneration.py does (its vLLM
defaults: 512 prompts a call, 4 calls in flight), greedy, <= `--max-new-tokens`, stop id 2, after a
warm-up of 256 other prompts. Prompts: random token ids, 30..74 tokens (~52, like the chitchat
prompts of bench/regeneration.py). The engine admits at most `--max-num-seqs` prompts at once,
gives each running prompt one token per step, ends replies after 20..192 tokens (seeded per
prompt) and steps every `--step-ms` on its own clock, as vLLM's engine-core process does (the
GPU's decode step; 0: one step per call, the path's own ceiling). `--frontend-us-per-seq` and
`--add-us` add what vLLM's front end costs in the service's process, GIL held (measured on the
2-core dev machine: ~1 us per running request per step for output processing, ~270 us per
`add_request`).

Figures per (step ms, prompts): new tokens/s as prepare-data counts them (stop token dropped),
prompts/s, engine steps/s, mean running prompts per step; with --step-ms > 0 the ideal is
max_num_seqs tokens per step (128k tokens/s at 1 024 and 8 ms). `engine_alone` is the same
engine (no front-end cost) fed as many other prompts up front and stepped until done in the
service's process, no gRPC, no scheduler: the workload's own time, its tail included; the
path's share is its rate over that one's. Every reply is checked against what the engine must
have answered. `--profile` prints where the server's and the client's threads spend their
samples (bench/sampling_profiler.py).

`--vllm FOLDER` serves a real `VllmBackend` (generation only, `--vllm-arg` engine arguments)
instead and compares the service with the engine alone (our `VllmGenerationStream` fed every
prompt at once and stepped directly; other prompts, so neither finds the other's prefixes
cached). Run it where vLLM imports (the GPU image, or `.venv-vllm/bin/python` with
`--dtype float32 --vllm-arg=--enforce-eager`).

Rows (bench/rows.py) to `<out>/generate_path.json`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rows import emit_rows  # noqa: E402
from bench.sampling_profiler import SamplingProfiler  # noqa: E402
from bench.synthetic_generation import (  # noqa: E402
    EOS_TOKEN_ID,
    SyntheticEngine,
    SyntheticGenerateBackend,
    synthetic_reply,
)
from services.hidden_states.backends.base import GenerationParams, GenerationStream  # noqa: E402
from services.hidden_states.generate_client import GenerateClient  # noqa: E402

WARMUP_PROMPTS = 256
ALONE_SEED = 10_000  # the engine-alone pass runs other prompts than the service pass


def random_prompts(count: int, *, seed: int, vocab_size: int = 49_152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(30, 74))] for _ in range(count)]


def stream_alone(stream: GenerationStream, prompts: list[list[int]], params: GenerationParams) -> dict:
    """The stream fed every prompt at once and stepped until done: seconds, steps, new tokens."""
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        stream.add(f"alone-{index}", prompt, params)
    steps = tokens = 0
    while stream.unfinished:
        for _, completion in stream.step():
            tokens += len(completion.token_ids) - (completion.finish_reason == "stop")
        steps += 1
    return {"seconds": time.perf_counter() - started, "steps": steps, "tokens": tokens}


# ------------------------------------------------------------------------------ server (child)
def build_backend(settings: dict) -> Any:
    if "vllm" not in settings:
        return SyntheticGenerateBackend(SyntheticEngine(**settings["synthetic"]))
    import torch

    from services.hidden_states.backends.vllm_backend import VllmBackend

    vllm = settings["vllm"]
    return VllmBackend(
        vllm["model"],
        target_layer_ids=None,
        dtype=getattr(torch, vllm["dtype"]),
        max_length=vllm["max_length"],
        max_batch_tokens=16384,
        engine_args=vllm["engine_args"],
        generate_only=True,
    )


def serve(conn: Connection, settings: dict) -> None:
    """The service in its own process. Sends (address, device, vocab size, eos ids), then answers
    "stats", ("alone", prompts, max_new_tokens), "profile", "report" and "stop" on `conn`."""
    import torch

    from services.hidden_states.server import HiddenStateServer

    backend = build_backend(settings)
    server = HiddenStateServer(backend, host="127.0.0.1", port=0, payload_port=0).start()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    info = backend.info
    conn.send((server.address, device, info.fingerprint.vocab_size, info.eos_token_ids))
    profiler: SamplingProfiler | None = None
    try:
        while True:
            command = conn.recv()
            if command == "stats":
                engine = backend.generation_stream
                conn.send(engine.stats.as_dict() if isinstance(engine, SyntheticEngine) else {})
            elif isinstance(command, tuple) and command[0] == "alone":
                _, prompts, params = command
                if "vllm" in settings:  # the worker is idle: no Generate call runs meanwhile
                    conn.send(stream_alone(backend.generation_stream, prompts, params))
                else:  # a fresh engine: the GPU's time alone, no front-end cost
                    synthetic = settings["synthetic"]
                    engine = SyntheticEngine(
                        max_num_seqs=synthetic["max_num_seqs"], step_s=synthetic["step_s"]
                    )
                    conn.send(stream_alone(engine, prompts, params))
            elif command == "profile":
                profiler = SamplingProfiler().start()
                conn.send(True)
            elif command == "report":
                conn.send(profiler.stop().report() if profiler is not None else "")
                profiler = None
            elif command == "stop":
                break
    finally:
        server.stop(grace=1.0)
        conn.send("stopped")


# ------------------------------------------------------------------------------ driver
def run_one(
    conn: Connection, address: str, count: int, *, args: argparse.Namespace, label: str, step_ms: float,
    vocab_size: int, stop_ids: list[int],
) -> tuple[dict[str, tuple[float, str]], str]:  # fmt: skip
    """One timed pass through the service, then the engine alone: rows and the client's settings."""
    prompts = random_prompts(count, seed=count, vocab_size=vocab_size)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(stop_ids))
    with GenerateClient(
        [address], batch_size=args.batch_size, requests_per_endpoint=args.requests_per_endpoint
    ) as client:
        warmup = random_prompts(WARMUP_PROMPTS, seed=1, vocab_size=vocab_size)
        client.complete(warmup, max_new_tokens=16, stop_token_ids=stop_ids)
        conn.send("stats")
        before = conn.recv()
        client_profiler = None
        if args.profile:
            conn.send("profile")
            conn.recv()
            client_profiler = SamplingProfiler().start()
        started = time.perf_counter()
        replies = client.complete(prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=stop_ids)
        seconds = time.perf_counter() - started
        if client_profiler is not None:
            conn.send("report")
            print(f"---- server profile ({count} prompts, {label})\n{conn.recv()}")
            print(f"---- client profile\n{client_profiler.stop().report()}", flush=True)
        conn.send("stats")
        after = conn.recv()
    if not args.vllm:
        expected = [
            synthetic_reply(p, params, lengths=(20, 192), eos_token_ids=(EOS_TOKEN_ID,)) for p in prompts
        ]
        wrong = sum(
            reply != (e.token_ids[:-1] if e.finish_reason == "stop" else e.token_ids)
            for reply, e in zip(replies, expected, strict=True)
        )
        if wrong:
            raise SystemExit(f"{wrong} of {count} replies differ from what the engine answered")
    new_tokens = sum(map(len, replies))
    rate = new_tokens / seconds
    tag = f"_{count}_prompts_{label}"
    results = {
        f"generate_path_tokens_per_s{tag}": (rate, "tokens/s"),
        f"generate_path_prompts_per_s{tag}": (count / seconds, "prompts/s"),
        f"generate_path_seconds{tag}": (seconds, "s"),
    }
    line = (
        f"{label}, {count} prompts: {new_tokens} new tokens in {seconds:.2f} s = {rate:,.0f}/s, "
        f"{count / seconds:,.0f} prompts/s"
    )
    if before:  # the synthetic engine counts its steps
        steps, engine_tokens = after["steps"] - before["steps"], after["tokens"] - before["tokens"]
        results[f"generate_path_steps_per_s{tag}"] = (steps / seconds, "steps/s")
        results[f"generate_path_running_per_step{tag}"] = (engine_tokens / max(steps, 1), "prompts")
        line += f", {steps / seconds:,.0f} steps/s, {engine_tokens / max(steps, 1):.0f} running a step"
        if step_ms > 0:
            ideal = args.max_num_seqs / (step_ms / 1000)
            results[f"generate_path_fraction_of_ideal{tag}"] = (engine_tokens / seconds / ideal, "fraction")
            line += f" ({engine_tokens / seconds / ideal:.0%} of {ideal:,.0f} tokens/s)"
    if args.vllm or step_ms > 0:  # at 0 ms the engine alone would time only the bench's own Python
        conn.send(("alone", random_prompts(count, seed=ALONE_SEED + count, vocab_size=vocab_size), params))
        alone = conn.recv()
        alone_rate = alone["tokens"] / alone["seconds"]
        results[f"generate_path_engine_alone_tokens_per_s{tag}"] = (alone_rate, "tokens/s")
        results[f"generate_path_fraction_of_engine_alone{tag}"] = (rate / alone_rate, "fraction")
        line += f"; engine alone {alone_rate:,.0f}/s ({alone['steps']} steps): the path gets "
        line += f"{rate / alone_rate:.1%}"
    client_settings = f"{client.batch_size} prompts a call, {client.requests_per_endpoint} calls in flight"
    print(line, flush=True)
    return results, client_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 8.0])
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, help="Prompts a Generate call (the client's vLLM default).")
    parser.add_argument("--requests-per-endpoint", type=int, help="Calls in flight (the client's default).")
    parser.add_argument(
        "--frontend-us-per-seq", type=float, default=0.0,
        help="GIL-held cost of vLLM's output processing per running prompt per step (~1 measured here).",
    )  # fmt: skip
    parser.add_argument(
        "--add-us",
        type=float,
        default=0.0,
        help="GIL-held cost of vLLM's add_request per prompt (~270 here).",
    )
    parser.add_argument("--vllm", metavar="FOLDER", help="Serve this verifier with the real vllm backend.")
    parser.add_argument("--dtype", default="bfloat16", help="--vllm: the engine's dtype.")
    parser.add_argument(
        "--vllm-arg", dest="vllm_args", action="append", default=[],
        help="--vllm: an engine argument (repeatable): --vllm-arg=--max-num-seqs=512",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="Print where the threads spend their time.")
    parser.add_argument("--out", type=Path, help="Folder for generate_path.json (default: print only).")
    args = parser.parse_args(argv)

    frontend = args.frontend_us_per_seq > 0 or args.add_us > 0
    runs: list[tuple[str, float, dict]] = []
    if args.vllm:
        settings = {"model": args.vllm, "dtype": args.dtype, "engine_args": args.vllm_args}
        settings["max_length"] = 74 + args.max_new_tokens + 1
        runs.append(("vllm", 0.0, {"vllm": settings}))
    else:
        for step_ms in args.step_ms:
            engine = dict(
                max_num_seqs=args.max_num_seqs,
                step_s=step_ms / 1000,
                frontend_us_per_seq=args.frontend_us_per_seq,
                add_us=args.add_us,
            )
            label = f"step_{step_ms:g}ms" + ("_vllm_frontend" if frontend else "")
            runs.append((label, step_ms, {"synthetic": engine}))

    results: dict[str, tuple[float, str]] = {}
    device = client_settings = ""
    context = mp.get_context("spawn")
    for label, step_ms, settings in runs:
        conn, child_conn = context.Pipe()
        # Not a daemon: vLLM starts its engine-core process from it.
        child = context.Process(target=serve, args=(child_conn, settings))
        child.start()
        try:
            while not conn.poll(1.0):
                if not child.is_alive():
                    raise SystemExit(f"the service process died (exit code {child.exitcode}); see above")
            address, device, vocab_size, eos_ids = conn.recv()
            stop_ids = [EOS_TOKEN_ID] if not args.vllm else list(eos_ids)
            for count in args.prompts:
                rows, client_settings = run_one(
                    conn, address, count, args=args, label=label, step_ms=step_ms, vocab_size=vocab_size,
                    stop_ids=stop_ids,
                )  # fmt: skip
                results.update(rows)
        finally:
            if child.is_alive():
                conn.send("stop")
                conn.recv()
            child.join(30)

    if args.vllm:
        engine_args = " ".join(args.vllm_args) or "(defaults)"
        config = f"vllm backend --generate-only on {args.vllm} ({args.dtype}, engine arguments {engine_args})"
    else:
        config = (
            f"synthetic engine (bench/synthetic_generation.py): max_num_seqs {args.max_num_seqs}, replies of "
            "20..192 tokens"
        )
        if frontend:
            config += (
                f", vLLM front end modelled: {args.frontend_us_per_seq:g} us per running prompt per step, "
                f"{args.add_us:g} us per prompt added"
            )
    config += (
        f"; <= {args.max_new_tokens} new tokens, greedy, prompts of 30..74 random ids; server in a child "
        f"process on 127.0.0.1; GenerateClient: {client_settings}"
    )
    emit_rows(
        results, config=config, device=device, out=args.out / "generate_path.json" if args.out else None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
