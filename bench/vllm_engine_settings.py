"""vLLM's engine alone on the regeneration workload, under several engine settings and replica counts.

    python3 bench/vllm_engine_settings.py --out "$OUT"            # one GPU, SmolLM2-135M (see below)
    python3 bench/vllm_engine_settings.py --smoke --out /tmp/es   # CPU: vLLM's CPU build, 32 prompts

The prompts are bench/regeneration.py's (distinct chitchat user turns, single-turn, greedy, at most
`--max-new-tokens`, stopping at the end of turn). Each setting starts `replicas` engines, each in its
own process with its share of the GPU's memory and of the prompts, warms them on other prompts, then
starts them together (a file barrier) on `LLM.generate` of all their prompts at once; the figure is
all new tokens over the slowest replica's time. The engine's keyword arguments are the ones the
service's `--generate-only` vLLM backend sets, plus the setting's own: so the rows say what the
engine can do under each setting, with no service around it.

On the lent GPU, from the repository root (wheels as for bench/regeneration.py):

    source bench/quality/device_setup.sh && source bench/device/vllm_gpu_setup.sh \\
        && python3 bench/vllm_engine_settings.py --out "$OUT"

Rows (bench/rows.py) to `<out>/vllm_engine_settings.json`: `engine_tokens_per_s[<setting>]` and
each setting's start-up seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rows import emit_rows  # noqa: E402

# (name, replicas, engine keyword arguments over the service's generate-only defaults)
DEFAULT_SETTINGS: list[tuple[str, int, dict]] = [
    ("service_defaults", 1, {}),
    ("cudagraphs_to_1024", 1, {"max_cudagraph_capture_size": 1024}),
    ("3_replicas_cudagraphs_to_1024", 3, {"max_cudagraph_capture_size": 1024}),
]
WARMUP_PROMPTS = 128


def engine_kwargs(folder: str, *, max_model_len: int, dtype: str, overrides: dict) -> dict:
    """What services/hidden_states/backends/vllm_backend.py gives `LLM` with --generate-only."""
    return {
        "model": folder,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": 16384,
        "enable_prefix_caching": True,
        "max_num_seqs": 1024,
        "distributed_executor_backend": "uni",
        **overrides,
    }


def child(spec_path: Path) -> None:
    """One replica: build the engine, warm it, wait at the barrier, generate, write the result."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(spec_path.read_text())
    started = time.perf_counter()
    llm = LLM(**spec["engine"])
    startup_s = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=spec["max_new_tokens"], temperature=0.0, stop_token_ids=spec["stop_ids"], detokenize=False
    )
    warm = SamplingParams(max_tokens=16, temperature=0.0, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["warmup"]], warm, use_tqdm=False)
    Path(spec["ready"]).write_text("ready")
    while not Path(spec["go"]).exists():
        time.sleep(0.01)
    began = time.time()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False
    )
    ended = time.time()
    tokens = sum(len(o.outputs[0].token_ids) - (o.outputs[0].finish_reason == "stop") for o in outputs)
    Path(spec["result"]).write_text(
        json.dumps(dict(began=began, ended=ended, tokens=tokens, startup_s=startup_s))
    )


def run_setting(
    name: str, replicas: int, overrides: dict, *, prompts: list[list[int]], warmup: list[list[int]],
    folder: str, args: argparse.Namespace, stop_ids: list[int], workdir: Path,
) -> dict:  # fmt: skip
    """Start `replicas` engines one by one (each sizes its cache from the memory left), time them together."""
    share = (args.gpu_memory_utilization / replicas) if not args.smoke else None
    kwargs = engine_kwargs(
        folder, max_model_len=args.max_prompt_tokens + args.max_new_tokens + 1, dtype=args.dtype,
        overrides={**({"gpu_memory_utilization": share} if share else {}), **args.smoke_engine, **overrides},
    )  # fmt: skip
    go = workdir / f"{name}.go"
    procs, results = [], []
    for r in range(replicas):
        spec = workdir / f"{name}.{r}.json"
        results.append(workdir / f"{name}.{r}.result")
        ready = workdir / f"{name}.{r}.ready"
        spec.write_text(json.dumps(dict(
            engine=kwargs, prompts=prompts[r::replicas], warmup=warmup, stop_ids=stop_ids,
            max_new_tokens=args.max_new_tokens, ready=str(ready), go=str(go), result=str(results[-1]),
        )))  # fmt: skip
        # vLLM may live in another Python (its CPU build in .venv-vllm): that one runs the engines.
        python = os.environ.get("DFLASH_VLLM_PYTHON", sys.executable)
        procs.append(subprocess.Popen([python, __file__, "--child", str(spec)]))
        while not ready.exists():  # the next engine sizes its KV cache after this one took its own
            if procs[-1].poll() is not None:
                raise SystemExit(
                    f"{name}: replica {r} exited with {procs[-1].returncode} before it was ready"
                )
            time.sleep(0.2)
    go.write_text("go")
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{name}: a replica exited with {proc.returncode}")
    done = [json.loads(p.read_text()) for p in results]
    seconds = max(d["ended"] for d in done) - min(d["began"] for d in done)
    tokens = sum(d["tokens"] for d in done)
    row = dict(name=name, replicas=replicas, overrides=overrides, tokens=tokens, seconds=seconds,
               tokens_per_s=tokens / seconds, startup_s=sum(d["startup_s"] for d in done))  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="CPU: 32 prompts, 16 new tokens, eager, float32")
    parser.add_argument("--prompts", type=int, default=8192)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.8, help="Shared by a setting's replicas."
    )
    parser.add_argument(
        "--setting", action="append", default=[], metavar="JSON",
        help='[name, replicas, {engine kwargs}] (repeatable; default: the built-in three)',
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="Folder for vllm_engine_settings.json (default: print only)."
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0

    from bench.regeneration import chitchat_prompts
    from dflash_core.config import EMBEDDED_VERIFIER
    from dflash_core.data.regenerate import end_of_turn_ids
    from dflash_core.evaluation import eos_token_ids
    from dflash_core.verifier import load_tokenizer, load_verifier_config, transformers_folder

    args.smoke_engine = {}
    if args.smoke:
        args.prompts, args.max_new_tokens, args.max_prompt_tokens = min(args.prompts, 32), 16, 96
        args.dtype = "float32"
        args.smoke_engine = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
    settings = [tuple(json.loads(s)) for s in args.setting] or DEFAULT_SETTINGS
    if args.smoke and not args.setting:
        settings = [("service_defaults", 1, {}), ("2_replicas", 2, {})]
    folder = transformers_folder(EMBEDDED_VERIFIER)
    tokenizer = load_tokenizer(EMBEDDED_VERIFIER)
    stop_ids = list(
        dict.fromkeys(end_of_turn_ids(tokenizer) + eos_token_ids(tokenizer, load_verifier_config(folder)))
    )
    every = chitchat_prompts(
        tokenizer, count=args.prompts + WARMUP_PROMPTS, max_prompt_tokens=args.max_prompt_tokens
    )
    prompts, warmup = every[: args.prompts], every[args.prompts :]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"engine-settings-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    device = "cpu (smoke)" if args.smoke else _gpu_name()
    out = (
        args.out / ("vllm_engine_settings_smoke.json" if args.smoke else "vllm_engine_settings.json")
        if args.out
        else None
    )
    measured = 0
    for name, replicas, overrides in settings:
        try:
            row = run_setting(
                name, replicas, overrides, prompts=prompts, warmup=warmup, folder=folder, args=args,
                stop_ids=stop_ids, workdir=workdir,
            )  # fmt: skip
        except SystemExit as failed:  # one setting failing (memory, an unknown argument) skips it only
            print(f"{name}: {failed}", flush=True)
            continue
        measured += 1
        config = (
            f"{len(prompts)} chitchat prompts, <= {args.max_new_tokens} new tokens, greedy, {args.dtype}; "
            f"{replicas} engine(s), LLM.generate of their share each; engine kwargs over --generate-only's: "
            f"{json.dumps(overrides)}; {args.gpu_memory_utilization} of the GPU's memory in all"
        )
        emit_rows(
            {f"engine_tokens_per_s[{name}]": (row["tokens_per_s"], "tokens/s"),
             f"engine_startup_s[{name}]": (row["startup_s"], "s")},
            config=config, device=device, out=out,
        )  # fmt: skip
    return 0 if measured else 1


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
