"""Samples/s of the hidden-state service's transformers backend, end to end, vs the GPU's limit.

    python bench/hidden_state_service.py --shape qwen3-8b --tokens 2048 --samples 64   # on a GPU
    python bench/hidden_state_service.py --quick                                       # CPU smoke run

A randomly initialised verifier of the given shape (bf16) is served by the real gRPC server in
this process; a separate client process pulls samples through `GrpcSource` (the trainer's client,
bytes landing in its memory) and reports what it received. Alongside, the backend's forward alone
(no gRPC) on the same batches gives the compute-only rate, and 2 x params x tokens over the card's
bf16 peak gives the ceiling. Rows go to bench/results/hidden_state_service[_<device>].json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.hidden_states.backends.transformers_backend import TransformersBackend  # noqa: E402
from services.hidden_states.server import HiddenStateServer  # noqa: E402
from tests.factories.tokenizers import make_chat_tokenizer  # noqa: E402

SHAPES = {
    # Qwen3-8B: 36 layers, hidden 4096, 32 q / 8 kv heads of 128, MLP 12288, vocab 151936.
    "qwen3-8b": dict(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128),
    "tiny": dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}  # fmt: skip
BF16_PEAK_FLOPS = 790e12  # measured dense bf16 GEMM ceiling of one H200 (docs/benchmarks.md)


def build_backend(shape: str, *, device: str, max_batch_tokens: int) -> TransformersBackend:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = make_chat_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=32768, **SHAPES[shape])
    config.architectures = ["Qwen3ForCausalLM"]
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.eval().requires_grad_(False)
    num_layers = config.num_hidden_layers
    layer_ids = sorted({2, num_layers // 2, num_layers - 3})
    return TransformersBackend(
        model, tokenizer, name_or_path=f"random-{shape}", target_layer_ids=layer_ids,
        max_length=32768, max_batch_tokens=max_batch_tokens,
    )  # fmt: skip


def client(address: str, layer_ids: list[int], vocab: int, tokens: int, samples: int, queue) -> None:
    """The trainer's side, in its own process: pull `samples` samples, report bytes and time."""
    from services.trainer.grpc_source import GrpcSource
    from services.trainer.sources import SampleRequest

    source = GrpcSource([address], target_layer_ids=layer_ids, inflight_bytes=4 << 30, streams_per_endpoint=2)
    requests = [
        SampleRequest(sample_id=i, input_ids=torch.randint(0, vocab, (tokens,))) for i in range(samples)
    ]
    warm = source.extract(requests[:2])  # first forward: CUDA context, kernels
    del warm
    started = time.perf_counter()
    source.prefetch(requests[2:])
    received = 0
    for start in range(2, samples, 8):
        for states in source.extract(requests[start : start + 8]):
            received += states.aux.numel() * states.aux.element_size() + states.last.numel() * 2
    elapsed = time.perf_counter() - started
    source.close()
    queue.put({"samples": samples - 2, "seconds": elapsed, "bytes": received})


def forward_only(backend: TransformersBackend, *, tokens: int, samples: int) -> float:
    """Seconds for `samples` sequences through the backend alone (no gRPC, no copies to the client)."""
    vocab = backend.info.fingerprint.vocab_size
    sequences = [torch.randint(0, vocab, (tokens,)) for _ in range(samples)]
    backend.extract(sequences[:2])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, samples, 8):
        backend.extract(sequences[start : start + 8])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--quick", action="store_true", help="tiny shape, few samples (CPU smoke run)")
    parser.add_argument("--device-name", default=None, help="label for the results (default: detected)")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.tokens, args.samples = "tiny", 256, 18
    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = args.device_name or (torch.cuda.get_device_name() if device == "cuda" else "cpu")

    backend = build_backend(args.shape, device=device, max_batch_tokens=args.max_batch_tokens)
    # Forward FLOPs: 2 per decoder-layer parameter per token (embedding lookups are free; the LM
    # head never runs: capture stops after layer N). Attention scores add ~2*T*H per layer-token.
    layer_params = sum(p.numel() for p in backend.model.model.layers.parameters())
    compute_s = forward_only(backend, tokens=args.tokens, samples=args.samples)
    server = HiddenStateServer(backend, host="127.0.0.1", port=0, max_pending_per_stream=16).start()
    queue: mp.Queue = mp.get_context("spawn").Queue()
    aux_ids = [i for i in backend.info.layer_ids if i != backend.info.fingerprint.num_layers]
    process = mp.get_context("spawn").Process(
        target=client,
        args=(server.address, aux_ids, backend.info.fingerprint.vocab_size, args.tokens, args.samples, queue),
    )
    process.start()
    result = queue.get(timeout=1800)
    process.join()
    server.stop()

    tokens_total = result["samples"] * args.tokens
    shape = SHAPES[args.shape]
    attention = 2 * 2 * args.tokens / 2 * shape["num_attention_heads"] * shape["head_dim"]  # causal QK^T, PV
    flops = (2 * layer_params + attention * shape["num_hidden_layers"]) * tokens_total
    config = f"{args.shape}, {args.tokens} tokens/sample, layers {list(backend.info.layer_ids)}, bf16"
    today = date.today().isoformat()
    service_rate, forward_rate = result["samples"] / result["seconds"], args.samples / compute_s
    rows = [
        ("service_samples_per_s", service_rate, "samples/s"),
        ("service_tokens_per_s", tokens_total / result["seconds"], "tokens/s"),
        ("service_delivered_bytes_per_s", result["bytes"] / result["seconds"], "bytes/s"),
        ("backend_forward_samples_per_s", forward_rate, "samples/s"),
        ("service_vs_forward_ratio", service_rate / forward_rate, "ratio"),
    ]
    if device == "cuda":
        rows.append(("service_mfu", flops / result["seconds"] / BF16_PEAK_FLOPS, "fraction of 790 TFLOP/s"))
    records = [
        {"metric": m, "value": round(v, 4), "unit": u, "config": config, "device": label, "date": today}
        for m, v, u in rows
    ]
    for record in records:
        print(f"{record['metric']:>32}: {record['value']:>14,.4f} {record['unit']}")
    out = ROOT / "bench" / "results" / f"hidden_state_service{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
