"""`dflash generate-offline`: fetch hidden states from the service into the local cache.

    dflash serve-hidden-states Qwen/Qwen3-8B --target-layer-ids 2 18 33 &
    dflash generate-offline --data-path ./output/data --vllm-endpoint localhost:8000
    dflash train ... --data-path ./output/data --on-missing raise     # no service needed now

Samples already cached are skipped, so re-running resumes an interrupted fill.
"""

from __future__ import annotations

import argparse

from dflash_core.config import GenerateOfflineConfig
from dflash_core.config_args import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GenerateOfflineConfig)


def run(args: argparse.Namespace) -> int:
    from services.trainer.cache import HiddenStateCacheError
    from services.trainer.grpc_source import HiddenStateServiceError
    from services.trainer.offline import fill_cache
    from services.trainer.preflight import PreflightError

    config = config_from_args(GenerateOfflineConfig, args)
    try:
        report = fill_cache(config)
    except (HiddenStateServiceError, HiddenStateCacheError, PreflightError) as exc:
        print(f"error: {exc}")
        return 2
    print(report.summary())
    return 0 if not report.failed_writes else 1
