"""Runs inside the vLLM virtual environment (not ours): greedy decoding with and without our drafter.

    <vllm-python> tests/e2e/vllm_probe.py VERIFIER CHECKPOINT PROMPTS.json NUM_SPECULATIVE_TOKENS

PROMPTS.json holds a list of token-id lists. Prints one JSON object on its last line: the greedy
outputs of both runs and vLLM's own speculative-decoding counters.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~6 s instead of ~30


def main() -> None:
    from vllm import LLM, SamplingParams

    verifier, checkpoint, prompts_file, num_tokens = sys.argv[1:5]
    with open(prompts_file) as f:
        prompts = [{"prompt_token_ids": ids} for ids in json.load(f)]
    params = SamplingParams(temperature=0, max_tokens=32)
    # A fixed KV cache: by default vLLM's CPU build reserves 92% of RAM and refuses to start when
    # other processes (a second service, a parallel build) already hold some of it.
    engine = {
        # The checkpoint's own float32: vLLM's CPU build otherwise casts to bfloat16, where the
        # verifier's near-ties flip between a one-token and a block forward.
        "dtype": "float32",
        "enforce_eager": True,
        "distributed_executor_backend": "uni",
        "max_model_len": 512,
        "kv_cache_memory_bytes": 256 << 20,
    }
    llm = LLM(model=verifier, **engine)
    plain = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    del llm
    speculative = {"method": "dflash", "model": checkpoint, "num_speculative_tokens": int(num_tokens)}
    llm = LLM(model=verifier, speculative_config=speculative, disable_log_stats=False, **engine)
    drafted = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            counters[metric.name] = getattr(metric, "values", None) or getattr(metric, "value", 0)
    print(json.dumps({"plain": plain, "speculative": drafted, "counters": counters}))


if __name__ == "__main__":
    main()
