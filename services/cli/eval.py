"""`dflash eval`: a drafter's acceptance length (tau) and speed, by real speculative decoding.

    dflash eval ./checkpoints/checkpoint_best --verifier Qwen/Qwen3-8B --prompts ./output/data
    dflash eval CKPT --prompts chitchat --num-prompts 32 --max-new-tokens 256 --output-json eval.json
    dflash eval CKPT --engine vllm            # vLLM's own DFlash decoding, under $DFLASH_VLLM_PYTHON

Prints tau (mean tokens committed per verifier forward that checked a block, vLLM's "mean
acceptance length"), the acceptance rate of each draft position, and tokens/s with and without
the drafter; `--output-json` writes the same as JSON. The verifier defaults to the one the
checkpoint names, and a verifier the drafter does not belong to is refused (it would decode
losslessly and accept ~nothing). Greedy decoding (`--temperature 0`, the default) reports
whether every output equals the verifier's own greedy output.
"""

from __future__ import annotations

import argparse
import json

from dflash_core.config_args import add_config_arguments, config_from_args
from dflash_core.eval_config import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig, positional=("checkpoint",))


def run(args: argparse.Namespace) -> int:
    from dflash_core.data.formats import DataError
    from dflash_core.evaluation import VerifierMismatchError, format_report, run_eval
    from dflash_core.export_zlab import ExportError
    from services.cli.eval_vllm import VllmEngineError, run_vllm_eval

    config = config_from_args(EvalConfig, args)
    try:
        report = run_vllm_eval(config) if config.engine == "vllm" else run_eval(config)
    except (VerifierMismatchError, VllmEngineError, DataError, ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(format_report(report))
    if config.output_json is not None:
        config.output_json.parent.mkdir(parents=True, exist_ok=True)
        config.output_json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {config.output_json}")
    return 0
