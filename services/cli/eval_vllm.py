"""`dflash eval --engine vllm`: vLLM's own DFlash speculative decoding of our checkpoint.

Two halves in one file:

- `run_vllm_eval(config)` runs in OUR environment: checks the drafter against the verifier,
  tokenizes the prompts, prepares what vLLM can load, then starts this module under
  `$DFLASH_VLLM_PYTHON` (vLLM lives in its own virtual environment, `make vllm-env`) and turns
  vLLM's answer into the same `EvalReport` the transformers engine gives.
- `main()` runs in VLLM'S environment (`python -m services.cli.eval_vllm REQUEST.json`): the
  verifier alone, then `LLM(model=VERIFIER, speculative_config={"method": "dflash", "model":
  CKPT, "num_speculative_tokens": B-1}, disable_log_stats=False)` (vLLM counts drafts only with
  its stats on), one prompt at a time like our engine; acceptance comes from vLLM's counters
  `vllm:spec_decode_num_drafts`, `..._num_accepted_tokens` and `..._num_accepted_tokens_per_pos`,
  read before and after the timed run. It imports only the standard library at module level.

vLLM cannot resolve `embedded:smollm2-135m-instruct` (nor a bare .gguf without its tokenizer
folder): that verifier is written out as a transformers folder first, and the checkpoint is
handed to vLLM as a copy whose config.json names that folder as its verifier (the tensors are
linked, not copied). The report says so. vLLM's process starts in the repository's folder, so
local paths (checkpoint, verifier) are handed over absolute; hub ids as they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dflash_core.eval_config import EvalConfig
    from dflash_core.evaluation import EvalReport

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_MARKER = "DFLASH_EVAL_VLLM_RESULT "


class VllmEngineError(RuntimeError):
    """vLLM is missing or failed; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------


def run_vllm_eval(config: EvalConfig) -> EvalReport:
    from dflash_core.checkpoint import CONFIG_FILE
    from dflash_core.eval_prompts import load_prompts
    from dflash_core.evaluation import check_verifier, eos_token_ids, resolve_verifier_name
    from dflash_core.export_zlab import detect_layout, drafter_config_from_zlab
    from dflash_core.speculators_config import drafter_config_from_speculators
    from dflash_core.verifier import load_tokenizer, load_verifier_config

    python = os.environ.get("DFLASH_VLLM_PYTHON")
    if not python:
        raise VllmEngineError(
            "--engine vllm needs vLLM, which lives in its own environment: build it (`make vllm-env` "
            "makes .venv-vllm) and set DFLASH_VLLM_PYTHON to that environment's python, or use "
            "--engine transformers"
        )
    config_path = config.checkpoint / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config.checkpoint} is not a checkpoint: it has no {CONFIG_FILE}")
    layout = detect_layout(config.checkpoint)
    data = json.loads(config_path.read_text())
    drafter = (
        drafter_config_from_zlab(data, verifier_name_or_path=config.verifier)
        if layout == "zlab"
        else drafter_config_from_speculators(data)
    )
    verifier_name = resolve_verifier_name(config, drafter)
    verifier_config = load_verifier_config(verifier_name)
    tokenizer = load_tokenizer(verifier_name)
    check_verifier(drafter, verifier_config=verifier_config, tokenizer=tokenizer, verifier_name=verifier_name)
    prompts = load_prompts(config.prompts, tokenizer=tokenizer, limit=config.num_prompts)
    longest = max(len(p.token_ids) for p in prompts)
    notes = ["vLLM engine, one prompt at a time; acceptance from vLLM's spec-decode counters"]

    with tempfile.TemporaryDirectory(prefix="dflash-eval-vllm-") as work_dir:
        work = Path(work_dir)
        verifier_path = _verifier_for_vllm(verifier_name, work, notes, dtype=config.dtype)
        checkpoint = Path(os.path.abspath(config.checkpoint))
        checkpoint_path = (
            str(checkpoint)  # vLLM reads z-lab configs natively; they name no verifier
            if layout == "zlab"
            else _checkpoint_for_vllm(checkpoint, verifier_path, work, notes)
        )
        request = {
            "verifier": verifier_path,
            "checkpoint": checkpoint_path,
            "num_speculative_tokens": drafter.block_size - 1,
            "prompts": [p.token_ids for p in prompts],
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "seed": config.seed,
            "stop_token_ids": eos_token_ids(tokenizer, verifier_config),
            "baseline": config.baseline,
            "max_model_len": config.vllm_max_model_len
            or longest + config.max_new_tokens + drafter.block_size,
            "dtype": config.dtype,  # auto: vLLM's choice (bfloat16 on CPUs that have it)
        }
        request_file = work / "request.json"
        request_file.write_text(json.dumps(request))
        result = _run_in_vllm(python, request_file)

    return _report(config, result, verifier_name=verifier_name, block_size=drafter.block_size,
                   num_prompts=len(prompts), notes=notes)  # fmt: skip


def _absolute_if_local(name: str) -> str:
    """`name` as an absolute path when it names something here (vLLM runs from another folder)."""
    return os.path.abspath(name) if Path(name).exists() else name


def _verifier_for_vllm(name: str, work: Path, notes: list[str], *, dtype: str) -> str:
    """A name vLLM can load: hub ids as they are, folders absolute; the embedded / GGUF verifier
    written out."""
    from dflash_core.config import EMBEDDED_VERIFIER

    if name != EMBEDDED_VERIFIER and not name.lower().endswith(".gguf"):
        return _absolute_if_local(name)
    import torch

    from dflash_core.verifier import load_verifier

    folder = work / "verifier"
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model, tokenizer = load_verifier(name, dtype=torch_dtype)
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained: copy its
    # (dequantized) weights into a plain model of the same config, and save that.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(torch_dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    notes.append(
        f"vLLM cannot load {name!r}: it was written out ({str(torch_dtype).removeprefix('torch.')}, "
        "dequantized) as a transformers folder, "
        "and the checkpoint's verifier_name_or_path was pointed at that folder for this run"
    )
    return str(folder)


def _checkpoint_for_vllm(checkpoint: Path, verifier_path: str, work: Path, notes: list[str]) -> str:
    """The checkpoint itself, or a linked copy whose config.json names `verifier_path` as its verifier."""
    from dflash_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    data = json.loads((checkpoint / CONFIG_FILE).read_text())
    verifier = data.setdefault("speculators_config", {}).setdefault("verifier", {})
    named = verifier.get("name_or_path")
    if named == verifier_path:
        return str(checkpoint)
    folder = work / "checkpoint"
    folder.mkdir()
    (folder / WEIGHTS_FILE).symlink_to((checkpoint / WEIGHTS_FILE).resolve())
    # A relative name is the same verifier when it resolves here to the same folder.
    if named and _absolute_if_local(named) != verifier_path and not str(verifier_path).startswith(str(work)):
        notes.append(f"checkpoint's verifier {named!r} overridden by {verifier_path!r}")
    verifier["name_or_path"] = verifier_path
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2))
    return str(folder)


def _run_in_vllm(python: str, request_file: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~6 s to start, not ~30
    argv = [python, "-m", "services.cli.eval_vllm", str(request_file)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False)
    except OSError as exc:
        raise VllmEngineError(f"cannot start $DFLASH_VLLM_PYTHON ({python}): {exc}") from exc
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (done.stderr or done.stdout)[-4000:]
    raise VllmEngineError(
        f"vLLM ({python}) exited {done.returncode} without a result; its output ends:\n{tail}"
    )


def _report(
    config: EvalConfig, result: dict[str, Any], *, verifier_name: str, block_size: int, num_prompts: int,
    notes: list[str],
) -> EvalReport:  # fmt: skip
    from dflash_core.evaluation import EvalReport

    drafts = int(result["drafts"])
    accepted = int(result["accepted_tokens"])
    per_position = [int(x) for x in result["accepted_per_position"]]
    per_position += [0] * (block_size - 1 - len(per_position))
    speculative, plain = result["speculative"], result.get("plain")
    new_tokens = sum(len(t) for t in speculative)
    identical = None
    if plain is not None and config.temperature == 0:
        identical = sum(a == b for a, b in zip(speculative, plain, strict=True))
    return EvalReport(
        engine="vllm",
        checkpoint=str(config.checkpoint),
        verifier=verifier_name,
        prompts=config.prompts,
        num_prompts=num_prompts,
        block_size=block_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        tau=1 + accepted / drafts if drafts else float("nan"),
        acceptance_per_position=[a / drafts if drafts else float("nan") for a in per_position],
        drafts=drafts,
        accepted_tokens=accepted,
        accepted_per_position=per_position,
        new_tokens=new_tokens,
        tokens_per_s=new_tokens / result["speculative_s"] if result["speculative_s"] > 0 else float("nan"),
        baseline_tokens_per_s=(
            sum(len(t) for t in plain) / result["plain_s"]
            if plain is not None and result["plain_s"] > 0
            else None
        ),
        outputs_identical=identical,
        notes=[
            *notes,
            f"vLLM {result.get('vllm_version', '?')} on {result.get('platform', '?')}, dtype {config.dtype}",
        ],
    )


# --------------------------------------------------------------------------------------------
# vLLM's side (runs under $DFLASH_VLLM_PYTHON)
# --------------------------------------------------------------------------------------------


def _counters(llm: Any) -> dict[str, Any]:
    counters: dict[str, Any] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            values = getattr(metric, "values", None)
            counters[metric.name] = list(values) if values is not None else getattr(metric, "value", 0)
    return counters


def _generate_each(llm: Any, prompts: list[list[int]], params: Any) -> tuple[list[list[int]], float]:
    outputs, seconds = [], 0.0
    for ids in prompts:
        start = time.perf_counter()
        done = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        seconds += time.perf_counter() - start
        outputs.append(list(done[0].outputs[0].token_ids))
    return outputs, seconds


def main(argv: list[str]) -> None:
    import gc

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    request = json.loads(Path(argv[0]).read_text())
    prompts: list[list[int]] = request["prompts"]
    params = SamplingParams(
        temperature=request["temperature"],
        max_tokens=request["max_new_tokens"],
        seed=request["seed"] if request["temperature"] > 0 else None,
        stop_token_ids=request["stop_token_ids"],
    )
    warmup = SamplingParams(temperature=0, max_tokens=4)
    engine: dict[str, Any] = {
        "enforce_eager": True,
        "max_model_len": request["max_model_len"],
        "dtype": request.get("dtype", "auto"),
    }
    if current_platform.is_cpu():
        # The CPU build reserves most of RAM for the KV cache by default and refuses to start when
        # other processes hold some of it; a fixed budget is plenty for one prompt at a time.
        engine.update(distributed_executor_backend="uni", kv_cache_memory_bytes=256 << 20)
    result: dict[str, Any] = {"vllm_version": vllm.__version__, "platform": type(current_platform).__name__}

    if request["baseline"]:
        llm = LLM(model=request["verifier"], **engine)
        llm.generate([{"prompt_token_ids": prompts[0]}], warmup, use_tqdm=False)
        result["plain"], result["plain_s"] = _generate_each(llm, prompts, params)
        del llm
        gc.collect()

    speculative = {
        "method": "dflash",
        "model": request["checkpoint"],
        "num_speculative_tokens": request["num_speculative_tokens"],
    }
    llm = LLM(model=request["verifier"], speculative_config=speculative, disable_log_stats=False, **engine)
    llm.generate([{"prompt_token_ids": prompts[0]}], warmup, use_tqdm=False)
    before = _counters(llm)
    result["speculative"], result["speculative_s"] = _generate_each(llm, prompts, params)
    after = _counters(llm)

    def delta(name: str) -> Any:
        now, then = after.get(f"vllm:spec_decode_{name}", 0), before.get(f"vllm:spec_decode_{name}", 0)
        if isinstance(now, list):
            then = then if isinstance(then, list) else []
            return [a - (then[i] if i < len(then) else 0) for i, a in enumerate(now)]
        return (now or 0) - (then or 0)

    result["drafts"] = delta("num_drafts")
    result["accepted_tokens"] = delta("num_accepted_tokens")
    result["accepted_per_position"] = delta("num_accepted_tokens_per_pos")
    result["draft_tokens"] = delta("num_draft_tokens")
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
