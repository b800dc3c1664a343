"""The hidden-state service with its vllm backend on a GPU: agreement with transformers, samples/s.

    python bench/vllm_service.py                 # on a CUDA machine with vLLM importable
    python bench/vllm_service.py --skip-speed    # agreement only (a small model, a minute)

1. Agreement. A small random Qwen3 (saved with real weights, bf16) is served through
   `dflash serve-hidden-states --backend vllm`; the trainer's client (`GrpcSource`) pulls samples
   of several lengths. They are compared with a float32 forward of the same weights (the truth)
   and, as the yardstick, with the transformers backend's bf16 forward: vLLM's kernels differ, so
   its error against the truth should be of the same size as transformers' own bf16 error.
2. Speed. A Qwen3-8B-shaped verifier with vLLM's random weights (`--load-format dummy`: only
   config.json and the tokenizer on disk) serves 2048-token samples to a client in another
   process, as bench/hidden_state_service.py does for the transformers backend.

Rows go to bench/results/vllm_service.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hidden_state_service import BF16_PEAK_FLOPS, SHAPES, client  # noqa: E402
from dflash_core.verifier import fingerprint_of, load_verifier  # noqa: E402
from services.hidden_states.launcher import LocalService  # noqa: E402
from services.trainer.grpc_source import GrpcSource  # noqa: E402
from services.trainer.sources import InProcessSource, SampleRequest  # noqa: E402
from tests.factories.tokenizers import make_chat_tokenizer  # noqa: E402
from tests.factories.verifiers import make_tiny_verifier  # noqa: E402

AGREEMENT_LAYERS = [1, 4, 6]
AGREEMENT_LENGTHS = [1, 17, 256, 1000, 2047, 64, 513, 5]


def launch_vllm_service(model: Path, layers: list[int], *, engine_args: list[str]) -> LocalService:
    return LocalService.launch(
        ["-m", "services.cli.main", "serve-hidden-states", str(model), "--backend", "vllm",
         "--target-layer-ids", *map(str, layers), "--dtype", "bfloat16", "--max-length", "4096",
         "--max-batch-tokens", "16384", "--", "--port", "0", *engine_args],
        timeout_s=900,
    )  # fmt: skip


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    got, truth = got.float().cpu(), truth.float().cpu()
    return float((got - truth).norm() / truth.norm())


def agreement(workdir: Path) -> list[tuple[str, float, str, str]]:
    tiny = make_tiny_verifier(
        workdir, num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=4, head_dim=128,
        intermediate_size=3072,
    )  # fmt: skip
    assert tiny.path is not None
    # bf16 weights on disk, so vLLM and transformers compute from the very same numbers.
    tiny.model.to(torch.bfloat16).save_pretrained(tiny.path)
    generator = torch.Generator().manual_seed(0)
    vocab = len(tiny.tokenizer)
    requests = [
        SampleRequest(sample_id=i, input_ids=torch.randint(0, vocab, (n,), generator=generator))
        for i, n in enumerate(AGREEMENT_LENGTHS)
    ]
    service = launch_vllm_service(
        tiny.path, AGREEMENT_LAYERS, engine_args=["--gpu-memory-utilization", "0.2"]
    )
    try:
        source = GrpcSource([service.address], target_layer_ids=AGREEMENT_LAYERS)
        served = source.extract(requests)
        fingerprint = source.fingerprint
        source.close()
    finally:
        service.stop()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_verifier(str(tiny.path), device="cuda", dtype=dtype)
        assert fingerprint == fingerprint_of(model.config, tokenizer, name_or_path=str(tiny.path))
        local = InProcessSource(model=model, fingerprint=fingerprint, target_layer_ids=AGREEMENT_LAYERS)
        results[dtype] = local.extract(requests)
        del model, local
    truth, bf16 = results[torch.float32], results[torch.bfloat16]
    vllm_err = max(relative_error(s.aux, t.aux) for s, t in zip(served, truth, strict=True))
    vllm_err_last = max(relative_error(s.last, t.last) for s, t in zip(served, truth, strict=True))
    hf_err = max(relative_error(s.aux, t.aux) for s, t in zip(bf16, truth, strict=True))
    max_abs = max(
        float((s.aux.float().cpu() - b.aux.float().cpu()).abs().max())
        for s, b in zip(served, bf16, strict=True)
    )
    config = (
        f"tiny qwen3 (8 layers, hidden 1024, bf16 weights), layers {AGREEMENT_LAYERS}, "
        f"lengths {AGREEMENT_LENGTHS}"
    )
    return [
        ("vllm_vs_fp32_rel_error_aux", vllm_err, "max over samples of |a-b|/|b|", config),
        ("vllm_vs_fp32_rel_error_last", vllm_err_last, "max over samples of |a-b|/|b|", config),
        ("transformers_bf16_vs_fp32_rel_error_aux", hf_err, "max over samples of |a-b|/|b|", config),
        ("vllm_vs_transformers_bf16_max_abs_diff", max_abs, "absolute", config),
    ]


def write_dummy_verifier(folder: Path, shape: str) -> Path:
    """config.json + tokenizer of a `shape` Qwen3; vLLM draws the weights (--load-format dummy)."""
    from transformers import Qwen3Config

    tokenizer = make_chat_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer) + 16, max_position_embeddings=32768, **SHAPES[shape])
    config.architectures = ["Qwen3ForCausalLM"]
    config.torch_dtype = "bfloat16"
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def speed(workdir: Path, *, shape: str, tokens: int, samples: int) -> list[tuple[str, float, str, str]]:
    model = write_dummy_verifier(workdir / f"dummy-{shape}", shape)
    num_layers = SHAPES[shape]["num_hidden_layers"]
    layers = sorted({2, num_layers // 2, num_layers - 3})
    service = launch_vllm_service(
        model, layers, engine_args=["--load-format", "dummy", "--gpu-memory-utilization", "0.6"]
    )
    try:
        queue: mp.Queue = mp.get_context("spawn").Queue()
        vocab = len(make_chat_tokenizer())
        process = mp.get_context("spawn").Process(
            target=client, args=(service.address, layers, vocab, tokens, samples, queue)
        )
        process.start()
        result = queue.get(timeout=1800)
        process.join()
    finally:
        service.stop()
    s = SHAPES[shape]
    # Decoder-layer parameters: attention (q, k, v, o) + MLP (gate, up, down); norms are negligible.
    hidden, heads, kv, head_dim = (
        s["hidden_size"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
        s["head_dim"],
    )
    layer_params = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * s["intermediate_size"]
    tokens_total = result["samples"] * tokens
    attention = 2 * 2 * tokens / 2 * heads * head_dim
    flops = (2 * layer_params + attention) * num_layers * tokens_total
    config = f"{shape} (vLLM dummy weights), {tokens} tokens/sample, layers {[*layers, num_layers]}, bf16"
    rate = result["samples"] / result["seconds"]
    return [
        ("vllm_service_samples_per_s", rate, "samples/s", config),
        ("vllm_service_tokens_per_s", tokens_total / result["seconds"], "tokens/s", config),
        ("vllm_service_delivered_bytes_per_s", result["bytes"] / result["seconds"], "bytes/s", config),
        ("vllm_service_mfu", flops / result["seconds"] / BF16_PEAK_FLOPS, "fraction of 790 TFLOP/s", config),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/vllm_service.py needs a CUDA GPU (vLLM's GPU build)")
    label = torch.cuda.get_device_name()
    import vllm

    rows: list[tuple[str, float, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rows += agreement(Path(tmp))
        print(f"agreement done in {time.perf_counter() - started:.0f} s", flush=True)
        if not args.skip_speed:
            rows += speed(Path(tmp), shape=args.shape, tokens=args.tokens, samples=args.samples)
    today = date.today().isoformat()
    records = [
        {"metric": m, "value": round(v, 6), "unit": u, "config": f"{c}, vllm {vllm.__version__}",
         "device": label, "date": today}
        for m, v, u, c in rows
    ]  # fmt: skip
    for record in records:
        print(f"{record['metric']:>42}: {record['value']:>14,.6f} {record['unit']}")
    out = ROOT / "bench" / "results" / "vllm_service.json"
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
