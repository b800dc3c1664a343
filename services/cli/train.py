"""`dflash train`: train a DFlash drafter (the tutorial's `scripts/train.py` flags are accepted).

    dflash train --verifier-name-or-path Qwen/Qwen3-8B --data-path ./output/data \
        --save-path ./output/checkpoints --speculator-type dflash --block-size 8 \
        --max-anchors 3072 --num-layers 5 --draft-vocab-size 8192 --target-layer-ids 2 18 33 \
        --epochs 5 --lr 3e-4 --total-seq-len 8192 --on-missing generate --on-generate delete

Re-running the same command resumes from `<save-path>/latest` (exact: weights, optimizer,
schedule, data position). `--no-resume` starts over.

Several GPUs: `dflash train --nproc 2 ...` relaunches itself under `torchrun --standalone`, or run
`torchrun --nproc-per-node 2 -m services.cli.main train ...` directly (FSDP2 either way).
SIGTERM or Ctrl-C stops after the current step with a checkpoint; the exit status is then
128 + the signal's number (143, 130), so schedulers see an unfinished run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

from dflash_core.config import TrainConfig
from dflash_core.config_args import add_config_arguments, config_from_args
from dflash_core.config_handover import HANDOVER_FLAG, config_from_handover, handover_args

if TYPE_CHECKING:
    from services.trainer.main import TrainResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)
    # How `--nproc N` hands its resolved config to the ranks it starts (not for users).
    parser.add_argument(HANDOVER_FLAG, dest="resolved_config", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from services.trainer.grpc_source import HiddenStateServiceError
    from services.trainer.main import run_training
    from services.trainer.preflight import PreflightError

    if args.resolved_config is not None:
        others = [name for name in TrainConfig.model_fields if name in vars(args)]
        if others or args.config_file is not None:
            print(f"error: {HANDOVER_FLAG} is the whole config; it takes no other config flag or --config")
            return 2
        config = config_from_handover(TrainConfig, [HANDOVER_FLAG, args.resolved_config])
    else:
        config = config_from_args(TrainConfig, args)
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_under_torchrun(config, log_level=args.log_level)  # does not return
    try:
        result = run_training(config)
    except (PreflightError, HiddenStateServiceError) as exc:
        print(f"error: {exc}")
        return 2
    code = report(result)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_rank(code)
    return code


def report(result: TrainResult) -> int:
    """Print how the run ended (rank 0 speaks for all); the exit status."""
    state = result.state
    if os.environ.get("RANK", "0") != "0":
        return 0 if state.stopped_by is None else 1  # rank 0 reports for the run
    if state.stopped_by is not None:
        print(
            f"stopped by {state.stopped_by} after {state.global_step} steps; checkpoint in "
            f"{result.save_path}/latest (run the same command to resume)"
        )
        signum = getattr(signal.Signals, state.stopped_by, None)
        return 128 + int(signum) if signum is not None else 1
    print(f"trained {state.global_step} steps over {state.epoch} epochs; checkpoints in {result.save_path}")
    if state.best_epoch is not None:
        print(
            f"best epoch {state.best_epoch}: val loss {state.best_val_loss:.4f} "
            f"-> {result.save_path}/checkpoint_best"
        )
    return 0


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank without the interpreter's shutdown.

    gloo's worker threads outlive `destroy_process_group` (device meshes keep the group alive)
    and free finished collectives, which takes the GIL; one that does so while the interpreter
    shuts down is killed inside a C++ destructor and aborts the rank ("terminate called without
    an active exception") after a run that succeeded. Everything the run wrote is closed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def relaunch_under_torchrun(config: TrainConfig, *, log_level: str) -> None:
    """Replace this process with `torchrun --standalone --nproc-per-node N` running this command.

    The ranks get the resolved config whole (flags, YAML, variables and defaults already merged),
    so every rank trains exactly what was asked. exec, not a child: signals reach torchrun directly.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.nproc}",
        "-m", "services.cli.main", "--log-level", log_level, "train", *handover_args(config),
    ]  # fmt: skip
    print(f"relaunching under torchrun with {config.nproc} processes", flush=True)
    os.execv(sys.executable, command)
