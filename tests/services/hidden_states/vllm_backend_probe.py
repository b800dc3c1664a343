"""Runs inside the vLLM virtual environment (not ours): the vllm backend on a saved verifier.

    <vllm-python> tests/services/hidden_states/vllm_backend_probe.py SPEC.json OUT.safetensors

SPEC.json: {"verifier", "target_layer_ids", "max_length", "max_batch_tokens", "engine_args",
"extract_calls": [[token ids, ...], ...], "generate": {"prompts", "max_new_tokens"}}. The backend
is built in float32 here and driven from another thread, as the service's worker drives it. Every
extracted tensor goes to OUT.safetensors as `call{c}_seq{i}`; the last stdout line is one JSON
object with the backend's info, the completions, error messages of the refused calls and timings.
"""

import json
import os
import sys
import threading
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: seconds, not ~30


def run_in_thread(fn: Any) -> Any:
    """`fn()` on a fresh thread, as the service's scheduler calls its backend."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from services.hidden_states.backends.base import GenerationParams
    from services.hidden_states.backends.vllm_backend import VllmBackend

    spec_file, out_file = sys.argv[1:3]
    with open(spec_file) as f:
        spec = json.load(f)
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    try:  # refused while parsing the engine arguments, before any engine starts
        VllmBackend(
            spec["verifier"],
            target_layer_ids=None,
            dtype=torch.float32,
            max_length=spec["max_length"],
            max_batch_tokens=spec["max_batch_tokens"],
            engine_args=["--data-parallel-size", "2"],
        )
    except ValueError as exc:
        errors["data_parallel"] = str(exc)
    start = time.perf_counter()
    backend = VllmBackend(
        spec["verifier"],
        target_layer_ids=spec["target_layer_ids"],
        dtype=torch.float32,
        max_length=spec["max_length"],
        max_batch_tokens=spec["max_batch_tokens"],
        engine_args=spec["engine_args"],
    )
    timings["start"] = time.perf_counter() - start

    tensors: dict[str, torch.Tensor] = {}
    shapes = []
    for call, sequences in enumerate(spec["extract_calls"]):
        batch = [torch.tensor(s, dtype=torch.long) for s in sequences]
        start = time.perf_counter()
        planes = run_in_thread(lambda batch=batch: backend.extract(batch))
        timings[f"extract{call}"] = time.perf_counter() - start
        for index, plane in enumerate(planes):
            tensors[f"call{call}_seq{index}"] = plane.contiguous()
        shapes.append([list(p.shape) for p in planes])

    too_long = [torch.zeros(backend.info.max_length + 1, dtype=torch.long)]
    try:
        run_in_thread(lambda: backend.extract(too_long))
    except ValueError as exc:
        errors["too_long"] = str(exc)

    gen = spec["generate"]
    params = GenerationParams(max_new_tokens=gen["max_new_tokens"])
    start = time.perf_counter()
    completions = run_in_thread(lambda: backend.generate(gen["prompts"], params))
    timings["generate"] = time.perf_counter() - start
    # Stop ids: the first greedy token of prompt 0 as a stop id ends that completion at once.
    first = completions[0].token_ids[0]
    stopped = run_in_thread(
        lambda: backend.generate(
            gen["prompts"][:1], GenerationParams(max_new_tokens=8, stop_token_ids=(first,))
        )
    )
    sampled = [
        run_in_thread(
            lambda seed=seed: backend.generate(
                gen["prompts"][:1], GenerationParams(max_new_tokens=8, temperature=1.0, seed=seed)
            )
        )[0].token_ids
        for seed in (7, 7, 8)
    ]

    # One more extraction after generation: the hooks must not have kept generation's rows.
    after = run_in_thread(lambda: backend.extract([torch.tensor(spec["extract_calls"][0][0])]))
    tensors["after_generate"] = after[0].contiguous()
    backend.close()
    save_file(tensors, out_file)
    info = backend.info
    print(
        json.dumps(
            {
                "info": {
                    "fingerprint": info.fingerprint.model_dump(),
                    "layer_ids": list(info.layer_ids),
                    "dtype": str(info.dtype),
                    "max_length": info.max_length,
                    "max_batch_tokens": info.max_batch_tokens,
                    "eos_token_ids": list(info.eos_token_ids),
                },
                "shapes": shapes,
                "completions": [[c.token_ids, c.finish_reason] for c in completions],
                "stopped": [stopped[0].token_ids, stopped[0].finish_reason],
                "sampled": sampled,
                "errors": errors,
                "timings": timings,
            }
        )
    )


if __name__ == "__main__":
    main()
