"""`dflash train`: train a DFlash drafter (the tutorial's `scripts/train.py` flags are accepted).

    dflash train --verifier-name-or-path Qwen/Qwen3-8B --data-path ./output/data \
        --save-path ./output/checkpoints --speculator-type dflash --block-size 8 \
        --max-anchors 3072 --num-layers 5 --draft-vocab-size 8192 --target-layer-ids 2 18 33 \
        --epochs 5 --lr 3e-4 --total-seq-len 8192 --on-missing generate --on-generate delete

Re-running the same command resumes from `<save-path>/latest` (exact: weights, optimizer,
schedule, data position). `--no-resume` starts over.
"""

from __future__ import annotations

import argparse

from dflash_core.config import TrainConfig
from services.cli.args import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from services.trainer.grpc_source import HiddenStateServiceError
    from services.trainer.main import run_training
    from services.trainer.preflight import PreflightError

    config = config_from_args(TrainConfig, args)
    try:
        result = run_training(config)
    except (PreflightError, HiddenStateServiceError) as exc:
        print(f"error: {exc}")
        return 2
    state = result.state
    print(f"trained {state.global_step} steps over {state.epoch} epochs; checkpoints in {result.save_path}")
    if state.best_epoch is not None:
        print(
            f"best epoch {state.best_epoch}: val loss {state.best_val_loss:.4f} "
            f"-> {result.save_path}/checkpoint_best"
        )
    return 0
