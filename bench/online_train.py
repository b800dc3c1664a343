"""The whole online system on one machine: hidden-state service + trainer sharing one GPU, measured.

    python bench/online_train.py                  # on a GPU: Qwen3-8B shapes, 60 steps
    python bench/online_train.py --minutes 10     # the same, stopped after 10 minutes of training
    python bench/online_train.py --shape tiny     # CPU smoke run, about 20 s

What runs. A randomly initialised verifier of Qwen3-8B's shape (36 layers, hidden 4096, 32/8 heads
of 128, MLP 12288, vocab 151936, bf16) is served by the real `HiddenStateServer` (transformers
backend) in its own process on 127.0.0.1. In this process, `run_training` trains a Qwen3-8B-shaped
DFlash drafter (5 layers, block 16, 512 anchors, packed rows of 8192 tokens, target layer ids
[2, 18, 33]) and pulls every sample's hidden states from that service over gRPC (`GrpcSource`,
via `TrainConfig.hidden_states_endpoint`). Both processes share the one GPU.

What is on disk (a temporary folder): a verifier folder the trainer reads (config.json, a small
ChatML tokenizer, and a model.safetensors holding ONLY the three head tensors the trainer loads:
embedding, final norm, LM head; ~2.5 GB instead of 16 GB), and `--samples` pre-tokenized rows of
`--tokens` random token ids (loss on the second half) prepared by the real `prepare_data`. The
service builds the full random model directly on its device and copies those same three head
tensors into it; it serves under the folder's path as its name, so the verifier fingerprints
(name, architecture, layers, hidden, vocab, tokenizer) of data, trainer and service agree.

How to read the figures (steady state: the first log window, which holds torch.compile and the
first forwards, is left out; `--log-freq` steps per window):

- wall_step_time_ms: seconds between log lines per step, the real pace of training.
  step_time_ms is the trainer's own timers (fetch + forward + backward + optimizer).
- trainer_tokens_per_s / trainer_samples_per_s: `train/tokens_per_s` and `train/samples_per_s`
  of metrics.jsonl over the steady windows (packed-row tokens; one sample = one row of data).
- data_wait_frac: `train/data_wait_frac`, the share of step time spent fetching the batch
  (waiting for hidden states, plus packing and the host-to-device copy).
- trainer_demand_samples_per_s: samples per second the trainer would consume if it never waited
  (samples over step time minus fetch time). At Qwen3-8B shape this is about 18 samples/s of 2048
  tokens (4 samples per 8192-token row, ~219 ms a step alone, bench/trainer_step.py); the service
  must deliver that for data_wait_frac to drop to ~0.
- service_samples_per_s / service_delivered_bytes_per_s: samples the service's scheduler finished
  (and their bf16 bytes, tokens x (3 + 1) layers x hidden x 2) during the steady windows.
  service_busy_frac is the share of that time the verifier's forward was running, and
  service_forward_samples_per_s the samples per second of forward time.
- *_peak_memory_gib: torch's allocator peak in each process; gpu_device_memory_peak_gib is the
  card's used memory sampled every 0.25 s (both processes, contexts and caches included).

On one GPU the verifier and the drafter share the card: samples/s is bounded by the verifier's
forward (about 8 samples/s of 2048 tokens alone on an H200, bench/hidden_state_service.py), so the
trainer waits for data most of each step. Production gives the service its own GPUs (or several
services); this run shows the cost of sharing one. Rows go to bench/results/online_train.json
(`--shape tiny`: online_train_quick.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dflash_core.config import PrepareDataConfig, TrainConfig  # noqa: E402
from dflash_core.data.prepare import prepare_data  # noqa: E402
from dflash_core.verifier import load_tokenizer, load_verifier_config, tokenizer_fingerprint  # noqa: E402
from tests.factories.tokenizers import make_chat_tokenizer  # noqa: E402

logger = logging.getLogger("online_train")

# The verifier's shape and the run that goes with it; every run setting can be overridden by a flag.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(
        verifier=dict(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960),
        target_layer_ids=[2, 18, 33], num_layers=5, block_size=16, max_anchors=512, total_seq_len=8192,
        tokens=2048, samples=512, max_steps=60, log_freq=5, max_batch_tokens=16384,
    ),
    # Small enough for a 2-core CPU: the same code path, every size cut down.
    "tiny": dict(
        verifier=dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=2048, max_position_embeddings=4096),
        target_layer_ids=[1, 2, 3], num_layers=5, block_size=16, max_anchors=32, total_seq_len=1024,
        tokens=256, samples=96, max_steps=20, log_freq=5, max_batch_tokens=2048,
    ),
}  # fmt: skip
# Samples the trainer may have requested but not consumed: the default --inflight-bytes (1 GiB) at
# Qwen3-8B shape (64 MiB a sample of 2048 tokens), kept in samples so the tiny run prefetches as deep.
PREFETCH_SAMPLES = 16
HEAD_FILE = "model.safetensors"  # holds only the three head tensors the trainer reads


# ---------------------------------------------------------------------------------------------
# What is on disk: the verifier folder the trainer reads, and the prepared data
# ---------------------------------------------------------------------------------------------


def write_verifier_folder(folder: Path, *, shape: dict[str, Any], seed: int = 0) -> None:
    """config.json, the tokenizer, and the embedding / final norm / LM head (bf16) in model.safetensors.

    `load_verifier_heads` reads only those three tensors from a safetensors file, so the decoder
    layers (16 GB at Qwen3-8B shape) are never written; nothing here loads the folder as a model.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    tokenizer = make_chat_tokenizer()
    config = Qwen3Config(
        **shape, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    vocab, hidden = shape["vocab_size"], shape["hidden_size"]
    heads = {
        "model.embed_tokens.weight": (0.02 * torch.randn(vocab, hidden, generator=generator)).bfloat16(),
        "model.norm.weight": (1 + 0.1 * torch.randn(hidden, generator=generator)).bfloat16(),
        "lm_head.weight": (0.02 * torch.randn(vocab, hidden, generator=generator)).bfloat16(),
    }
    save_file(heads, str(folder / HEAD_FILE), metadata={"format": "pt"})


def write_data(root: Path, *, verifier: Path, tokens: int, samples: int, seed: int = 0) -> Path:
    """`samples` rows of `tokens` random token ids (loss on the second half), through `prepare_data`.

    Ids are drawn from the tokenizer's own range, so the mask token (the first id past it) never
    appears, as in real data. The tokenizer is the one saved in the folder, as the trainer loads it.
    """
    tokenizer = load_tokenizer(str(verifier))
    vocab_size = load_verifier_config(str(verifier)).vocab_size
    generator = torch.Generator().manual_seed(seed)
    rows = root / "rows.jsonl"
    loss_mask = [0] * (tokens // 2) + [1] * (tokens - tokens // 2)
    with rows.open("w") as f:
        for _ in range(samples):
            ids = torch.randint(0, len(tokenizer), (tokens,), generator=generator).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": loss_mask}) + "\n")
    data = root / "data"
    prepare_data(
        PrepareDataConfig(model=str(verifier), data=[str(rows)], output=data, seq_length=tokens, seed=seed),
        tokenizer=tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab_size,
    )
    return data


# ---------------------------------------------------------------------------------------------
# The hidden-state service, in its own process
# ---------------------------------------------------------------------------------------------


def serve(
    *,
    verifier: Path,
    target_layer_ids: list[int],
    device: str,
    max_length: int,
    max_batch_tokens: int,
    ready: mp.Queue,
    stop: Any,
    results: mp.Queue,
) -> None:
    """Build the random verifier on `device`, serve it until `stop` is set, then report counters.

    Reports (time.time() at the end of each backend forward, samples in it, seconds it took), so
    the parent can count what was served within its steady-state window.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s service %(name)s: %(message)s")
    from safetensors.torch import load_file
    from transformers import Qwen3ForCausalLM

    from services.hidden_states.backends.transformers_backend import TransformersBackend
    from services.hidden_states.server import HiddenStateServer

    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the trainer needs cores too
    started = time.perf_counter()
    config = load_verifier_config(str(verifier))
    torch.manual_seed(1)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no float32 copy of 8B weights
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(default_dtype)
    model = model.to(torch.bfloat16)
    # The trainer's verifier heads come from the folder: the served model must use the same ones.
    missing, unexpected = model.load_state_dict(load_file(str(verifier / HEAD_FILE)), strict=False)
    assert not unexpected and all(".layers." in name for name in missing), (missing, unexpected)
    model.eval().requires_grad_(False)
    backend = TransformersBackend(
        model, load_tokenizer(str(verifier)), name_or_path=str(verifier), target_layer_ids=target_layer_ids,
        max_length=max_length, max_batch_tokens=max_batch_tokens,
    )  # fmt: skip

    forwards: list[tuple[float, int, float]] = []
    extract = backend.extract

    def timed_extract(sequences):  # the scheduler calls backend.extract: count each forward
        t0 = time.perf_counter()
        planes = extract(sequences)  # ends with the device-to-host copy: the forward is done
        forwards.append((time.time(), len(sequences), time.perf_counter() - t0))
        return planes

    backend.extract = timed_extract  # type: ignore[method-assign]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    server = HiddenStateServer(backend, host="127.0.0.1", port=0).start()
    ready.put({"address": server.address, "load_s": time.perf_counter() - started})
    stop.wait()
    results.put(
        {
            "forwards": forwards,
            "samples_served": server.scheduler.samples_served,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0,
        }
    )
    server.stop(grace=1.0)


def wait_ready(process: mp.Process, ready: mp.Queue, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return ready.get(timeout=1.0)
        except queue.Empty:  # look whether the service died
            if not process.is_alive():
                message = f"the hidden-state service exited with {process.exitcode} before serving"
                raise RuntimeError(message) from None
    raise TimeoutError(f"the hidden-state service was not serving after {timeout_s:.0f} s")


# ---------------------------------------------------------------------------------------------
# Watchers in this process: GPU memory, and the --minutes deadline
# ---------------------------------------------------------------------------------------------


class DeviceMemorySampler(threading.Thread):
    """The card's used memory (every process on it), sampled every `period_s`; keeps the peak."""

    def __init__(self, device: torch.device, period_s: float = 0.25) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.device, self.period_s = device, period_s
        self.peak_bytes = 0
        self._halt = threading.Event()  # not `_stop`: threading.Thread has a method of that name

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak_bytes = max(self.peak_bytes, total - free)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def stop_after(seconds: float) -> threading.Thread:
    """SIGTERM this process after `seconds`, once the trainer's stop handler is installed.

    The trainer takes SIGTERM as "stop after this step, with a checkpoint" (StopSignals); before
    its handler is in place SIGTERM would kill the process, so the watcher waits for it.
    """

    def watch() -> None:
        time.sleep(seconds)
        while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            time.sleep(0.5)
        logger.info("--minutes reached: asking the trainer to stop after this step")
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="deadline", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------
# Steady-state figures from metrics.jsonl and the service's forwards
# ---------------------------------------------------------------------------------------------


def steady_state(
    metrics_path: Path, forwards: list[tuple[float, int, float]], *, sample_bytes: int
) -> dict[str, tuple[float, str]]:
    """Figures over the log windows after the first (which holds compilation and warm-up)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("train/tokens_per_s") is not None]
    if len(train) < 2:
        raise SystemExit(
            f"{metrics_path} has {len(train)} training log line(s); the steady state needs at least two: "
            "raise --max-steps / --minutes or lower --log-freq"
        )
    first, steady = train[0], train[1:]
    steps, elapsed, fetch, tokens, samples = 0, 0.0, 0.0, 0.0, 0.0
    previous = first["step"]
    for row in steady:
        n, previous = row["step"] - previous, row["step"]
        per_step = sum(row[f"time/{k}_s"] for k in ("fetch", "forward", "backward", "optimizer"))
        steps += n
        elapsed += n * per_step
        fetch += n * row["time/fetch_s"]
        tokens += row["train/tokens_per_s"] * n * per_step
        samples += row["train/samples_per_s"] * n * per_step
    t0, t1 = first["time"], steady[-1]["time"]
    wall = t1 - t0
    window = [(n, busy) for t, n, busy in forwards if t0 < t <= t1]
    served, busy = sum(n for n, _ in window), sum(b for _, b in window)
    figures = {
        "steady_steps": (steps, "steps"),
        "wall_step_time_ms": (1e3 * wall / steps, "ms"),
        "step_time_ms": (1e3 * elapsed / steps, "ms"),
        "trainer_tokens_per_s": (tokens / elapsed, "tokens/s"),
        "trainer_samples_per_s": (samples / elapsed, "samples/s"),
        "data_wait_frac": (fetch / elapsed, "fraction of step time"),
        "trainer_demand_samples_per_s": (samples / max(elapsed - fetch, 1e-9), "samples/s"),
        "service_samples_per_s": (served / wall, "samples/s"),
        "service_delivered_bytes_per_s": (served * sample_bytes / wall, "bytes/s"),
        "service_busy_frac": (busy / wall, "fraction of wall time"),
        "service_forward_samples_per_s": (served / busy if busy else 0.0, "samples/s"),
        "first_window_loss": (train[0]["train/loss"], "nats"),
        "last_window_loss": (train[-1]["train/loss"], "nats"),
    }
    return figures


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the shape's)")
    parser.add_argument(
        "--minutes", type=float, default=None,
        help="stop this long after training starts (setup and compile included) instead of at --max-steps",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=None, help="rows of data (default: the shape's)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the shape's)")
    parser.add_argument("--log-freq", type=int, default=None, help="steps per log window")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="the service's forward budget")
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the draft layers (CUDA only; the trainer's default)")  # fmt: skip
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="an empty folder to keep verifier, data and checkpoints in (default: a temp dir, removed)",
    )  # fmt: skip
    parser.add_argument("--device-name", default=None, help="label for the results (default: detected)")
    args = parser.parse_args()
    for name in ("max_steps", "samples", "tokens", "log_freq", "max_batch_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, SHAPES[args.shape][name])
    if args.minutes is not None:
        # Only the clock stops the run: enough steps that the data (one epoch) runs out first.
        args.max_steps = None
    return args


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(name)s: %(message)s")
    args = parse_args()
    shape = SHAPES[args.shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = args.device_name or (torch.cuda.get_device_name() if device == "cuda" else "cpu")
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the service has the other half
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="online_train_"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        return run(args, shape=shape, device=device, label=label, workdir=workdir, began=began)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(
    args: argparse.Namespace, *, shape: dict[str, Any], device: str, label: str, workdir: Path, began: float
) -> int:
    from services.trainer.main import run_training

    verifier = workdir / "verifier"
    write_verifier_folder(verifier, shape=shape["verifier"])
    data = write_data(workdir, verifier=verifier, tokens=args.tokens, samples=args.samples)
    setup_s = time.perf_counter() - began

    # Bytes per sample on the wire: tokens x (target layers + layer N) x hidden, bf16.
    planes = len(shape["target_layer_ids"]) + 1
    sample_bytes = args.tokens * planes * shape["verifier"]["hidden_size"] * 2
    context = mp.get_context("spawn")
    ready, results, stop = context.Queue(), context.Queue(), context.Event()
    service = context.Process(
        target=serve,
        name="hidden-state-service",
        daemon=True,  # never outlives this process
        kwargs=dict(
            verifier=verifier, target_layer_ids=shape["target_layer_ids"], device=device,
            max_length=shape["total_seq_len"], max_batch_tokens=args.max_batch_tokens,
            ready=ready, stop=stop, results=results,
        ),
    )  # fmt: skip
    service.start()
    sampler = None
    try:
        info = wait_ready(service, ready, timeout_s=1800)
        if device == "cuda":
            sampler = DeviceMemorySampler(torch.device("cuda"))
            sampler.start()
        config = TrainConfig(
            verifier_name_or_path=str(verifier), data_path=data, save_path=workdir / "checkpoints",
            hidden_states_endpoint=[info["address"]], target_layer_ids=shape["target_layer_ids"],
            num_layers=shape["num_layers"], block_size=shape["block_size"], max_anchors=shape["max_anchors"],
            total_seq_len=shape["total_seq_len"], epochs=1, max_steps=args.max_steps,
            val_fraction=args.val_fraction, log_freq=args.log_freq, report_to=["jsonl"], device=device,
            compile=args.compile, resume=False, inflight_bytes=PREFETCH_SAMPLES * sample_bytes,
            # bf16 autocast as on CUDA (there `auto` means bf16), also on CPU: a float32 trainer fails
            # at its first forward on the service's bf16 hidden states (as `dflash demo` does it).
            dtype="bfloat16",
        )  # fmt: skip
        if args.minutes is not None:
            stop_after(60 * args.minutes)
        started = time.perf_counter()
        result = run_training(config)
        train_s = time.perf_counter() - started
    finally:
        stop.set()
        try:
            served = results.get(timeout=120) if service.is_alive() else None
        except queue.Empty:  # the service never got as far as serving
            served = None
        service.join(timeout=60)
        if service.is_alive():
            service.terminate()
        if sampler is not None:
            sampler.stop()
    if served is None:
        raise RuntimeError("the hidden-state service died during the run")

    figures = steady_state(result.save_path / "metrics.jsonl", served["forwards"], sample_bytes=sample_bytes)
    figures.update(
        {
            "steps": (result.state.global_step, "steps"),
            "service_samples_total": (served["samples_served"], "samples"),
            "service_load_s": (info["load_s"], "s"),
            "setup_s": (setup_s, "s"),
            "train_wall_s": (train_s, "s"),
        }
    )
    if device == "cuda":
        figures["trainer_peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30, "GiB")
        figures["service_peak_memory_gib"] = (served["peak_memory_bytes"] / 2**30, "GiB")
        figures["gpu_device_memory_peak_gib"] = (sampler.peak_bytes / 2**30 if sampler else 0.0, "GiB")

    v = shape["verifier"]
    config_text = (
        f"{args.shape}: verifier {v['num_hidden_layers']} layers, hidden {v['hidden_size']}, vocab "
        f"{v['vocab_size']}, bf16, transformers backend in its own process (gRPC on 127.0.0.1, max batch "
        f"{args.max_batch_tokens} tokens); drafter {shape['num_layers']} layers, block "
        f"{shape['block_size']} x {shape['max_anchors']} anchors, rows of {shape['total_seq_len']} tokens, "
        f"target layers {shape['target_layer_ids']}; {args.samples} samples x {args.tokens} tokens; "
        f"{result.state.global_step} steps, log every {args.log_freq}; "
        f"compile {'on' if args.compile and device == 'cuda' else 'off'}; one {device} device shared"
    )
    today = date.today().isoformat()
    records = [
        {"metric": m, "value": round(float(value), 4), "unit": unit, "config": config_text,
         "device": label, "date": today}
        for m, (value, unit) in figures.items()
    ]  # fmt: skip
    for record in records:
        print(f"{record['metric']:>32}: {record['value']:>16,.4f} {record['unit']}")
    out = ROOT / "bench" / "results" / f"online_train{'_quick' if args.shape == 'tiny' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
