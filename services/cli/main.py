"""The `dflash` command: one entry point for every part of the system.

    dflash prepare-data --model M --data sharegpt --output DIR
    dflash train --verifier-name-or-path M --data-path DIR --save-path CKPTS ...
    dflash demo

Subcommands are registered here, in one list. Each lives in its own module with
`add_arguments(parser)` and `run(args) -> int`; modules import torch and friends inside `run`,
so `dflash --help` stays fast. Arguments after a bare `--` are handed over untouched as
`args.passthrough` to the subcommands whose module sets `ACCEPTS_PASSTHROUGH` (engine arguments).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from dflash_core.config_args import split_passthrough

# (subcommand, module under services.cli, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("prepare-data", "prepare_data", "Tokenize conversations with the verifier's chat template."),
    ("serve-hidden-states", "serve_hidden_states", "Serve the verifier's hidden states over gRPC."),
    ("generate-offline", "generate_offline", "Fill the hidden-state cache from the service."),
    ("train", "train", "Train a DFlash drafter against a verifier."),
    ("eval", "eval", "Measure a drafter's acceptance length and speed by real speculative decoding."),
    ("export", "export", "Write a checkpoint in the z-lab/SGLang layout, or import one into ours."),
    ("demo", "demo", "Run the whole pipeline on the embedded default (SmolLM2, shipped chats, CPU)."),
    ("control-plane", "control_plane", "Serve the REST API that runs and tracks training jobs."),
    ("healthcheck", "healthcheck", "Exit 0 when a service answers its health endpoint (Docker HEALTHCHECK)."),
    ("trainer-agent", "trainer_agent", "Run the control plane's training jobs on this host's GPUs."),
    ("slurm-hidden-states", "slurm_hidden_states", "Write the sbatch script of a hidden-state service."),
]


class SpelledOutParser(argparse.ArgumentParser):
    """Flags must be spelled out: `--token SECRET` is an error, never `--token-file` (which would
    echo the secret back in its error). Subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = SpelledOutParser(prog="dflash", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(f"services.cli.{module_name}")
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, accepts_passthrough=getattr(module, "ACCEPTS_PASSTHROUGH", False))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough and not args.accepts_passthrough:
        parser.error(f"`dflash {args.command}` takes no arguments after `--` (got {' '.join(passthrough)})")
    args.passthrough = passthrough
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
