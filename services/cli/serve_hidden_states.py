"""`dflash serve-hidden-states`: the gRPC service that streams the verifier's hidden states.

    dflash serve-hidden-states Qwen/Qwen3-8B --target-layer-ids 2 18 33 --backend vllm \\
        -- --gpu-memory-utilization 0.9 --port 8000
    dflash serve-hidden-states                       # the embedded SmolLM2, transformers, CPU
    dflash serve-hidden-states Qwen/Qwen3-8B --backend vllm --generate-only   # Generate only, fast

Layer N (the last) is always served too. Arguments after `--` go to vLLM's engine, except
`--port` and `--host`, which this service takes (the tutorial's launch command puts them there).
vLLM lives in its own environment: when `--backend vllm` is asked for and this Python lacks
vLLM, the service starts under $DFLASH_VLLM_PYTHON (`make test` points it at .venv-vllm).
`--generate-only` serves regeneration and self-prompting (`prepare-data --regenerate-with`) at
vLLM's serving speed: no hidden states (Extract is refused), CUDA graphs and prefix caching on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.config_args import add_config_arguments, config_from_args
from dflash_core.config_handover import handover_args
from services.hidden_states.engine_args import config_with_engine_args

ACCEPTS_PASSTHROUGH = True
REPO_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ServeHiddenStatesConfig, positional=("model",))


def run(args: argparse.Namespace) -> int:
    config = config_with_engine_args(config_from_args(ServeHiddenStatesConfig, args), args.passthrough)
    if config.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return _run_in_vllm_environment(config)
    from services.hidden_states.main import serve

    return serve(config)


def _run_in_vllm_environment(config: ServeHiddenStatesConfig) -> int:
    python = os.environ.get("DFLASH_VLLM_PYTHON")
    if not python:
        print(
            "error: --backend vllm needs vLLM, which this Python lacks. Install it in its own environment "
            "(`make vllm-env` builds .venv-vllm) and set DFLASH_VLLM_PYTHON to that environment's python."
        )
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    argv = [python, "-m", "services.hidden_states.main", *handover_args(config)]
    sys.stdout.flush()
    os.execve(python, argv, env)
    return 0  # not reached
