"""`dflash slurm-hidden-states`: write the sbatch script of a long-running hidden-state service.

    dflash slurm-hidden-states --name qwen3-8b --registry /shared/dflash/registry \\
        --partition gpu --gpus-per-node 2 --time 2-00:00:00 --out qwen3-8b.sbatch \\
        -- Qwen/Qwen3-8B --target-layer-ids 2 18 33 --backend vllm \\
           --token-file /shared/dflash/service_token -- --tensor-parallel-size 2
    sbatch qwen3-8b.sbatch

Arguments after the first `--` are `dflash serve-hidden-states`'s (its own `--` and vLLM's
engine arguments included), checked here as that command would check them. The script starts
the service on the node, registers `host:port` as `<registry>/<name>.endpoint` once it answers
health checks, and removes the entry when it stops; a control plane started with
`--hidden-states-registry` lists it, and jobs name it `registry:<name>`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.config_args import config_from_args, split_passthrough
from services.cli import serve_hidden_states
from services.hidden_states.registry import check_name
from services.hidden_states.slurm_script import SlurmService, render

ACCEPTS_PASSTHROUGH = True
# serve-hidden-states flags the script sets itself, and what to do instead.
OWNED_FLAGS = {
    "--host": "it binds $DFLASH_BIND_HOST, 0.0.0.0 unless the job sets it",
    "--port": "use this command's --port",
    "--payload-port": "use this command's --payload-port",
}
# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or `infinite`.
SLURM_TIME = re.compile(r"(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|infinite|UNLIMITED)")
SLURM_MEM = re.compile(r"\d+[KMGT]?")


class SettingsError(ValueError):
    """A setting the script cannot run with; the message names the flag and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="Name it registers as; jobs write registry:NAME.")
    parser.add_argument(
        "--registry",
        type=Path,
        required=True,
        help="Folder on a file system every node and the control plane share (the control plane's "
        "--hidden-states-registry).",
    )
    parser.add_argument("--out", type=Path, required=True, help="Where to write the script ('-': stdout).")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's).")
    parser.add_argument("--account", help="Slurm account to charge.")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs of the node (0: a CPU service).")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores.")
    parser.add_argument("--mem", help="Memory, in Slurm's form (e.g. 200G); default: the partition's.")
    parser.add_argument("--time", help="Time limit (e.g. 2-00:00:00); default: the partition's.")
    parser.add_argument("--port", type=int, default=8000, help="gRPC port on the node.")
    parser.add_argument("--payload-port", type=int, default=8001, help="Payload port on the node.")
    parser.add_argument("--output", default="%x-%j.out", help="Slurm's --output pattern for the job's log.")
    parser.add_argument("--dflash", default="dflash", help="The command that runs dflash on the node.")
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="A shell line run before the service (repeatable), e.g. 'source /shared/venv/bin/activate'.",
    )


def run(args: argparse.Namespace) -> int:
    try:
        service = service_of(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    script = render(service)
    if str(args.out) == "-":
        sys.stdout.write(script)
        return 0
    try:
        args.out.write_text(script)
        args.out.chmod(0o755)
    except OSError as exc:
        print(f"error: --out {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: submit it with `sbatch {args.out}`; jobs name the service registry:{args.name}")
    return 0


def service_of(args: argparse.Namespace) -> SlurmService:
    """The script's settings from the flags; SettingsError for any that cannot work."""
    try:
        check_name(args.name)
    except ValueError as exc:
        raise SettingsError(f"--name: {exc}") from None
    for flag, value, low in (
        ("--gpus-per-node", args.gpus_per_node, 0),
        ("--cpus-per-task", args.cpus_per_task, 1),
        ("--port", args.port, 1),
        ("--payload-port", args.payload_port, 1),
    ):
        if value < low or (flag.endswith("port") and value > 65535):
            raise SettingsError(f"{flag} {value} is out of range")
    if args.port == args.payload_port:
        raise SettingsError(f"--port and --payload-port are both {args.port}: give them different ports")
    if args.time is not None and not SLURM_TIME.fullmatch(args.time):
        raise SettingsError(f"--time {args.time!r} is no Slurm time limit (e.g. 90, 12:00:00, 2-00:00:00)")
    if args.mem is not None and not SLURM_MEM.fullmatch(args.mem):
        raise SettingsError(f"--mem {args.mem!r} is no Slurm memory size (e.g. 200G)")
    check_serve_args(args.passthrough)
    return SlurmService(
        name=args.name,
        registry=args.registry.expanduser().absolute(),  # the job runs in another directory
        serve_args=list(args.passthrough),
        port=args.port,
        payload_port=args.payload_port,
        partition=args.partition,
        account=args.account,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        output=args.output,
        dflash=args.dflash,
        setup=list(args.setup),
    )


def check_serve_args(serve_args: list[str]) -> ServeHiddenStatesConfig:
    """Parse `serve_args` as `dflash serve-hidden-states` would on the node; SettingsError with its
    complaint. The node listens beyond loopback, so the service needs a token (or --insecure)."""
    ours, _engine = split_passthrough(serve_args)
    for arg in ours:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise SettingsError(f"{flag} after `--` is the script's to set: {OWNED_FLAGS[flag]}")
    parser = argparse.ArgumentParser(prog="dflash serve-hidden-states", add_help=False)
    serve_hidden_states.add_arguments(parser)
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            parsed = parser.parse_args(ours)
        # The node's environment is not this one: only what is written in the script counts.
        config = config_from_args(ServeHiddenStatesConfig, parsed, environ={})
    except SystemExit as exc:
        text = complaint.getvalue().strip().splitlines()[-1:] or [str(exc.code)]
        raise SettingsError(f"the serve-hidden-states arguments after `--`: {text[0]}") from None
    if config.token_file is None and not config.insecure:
        raise SettingsError(
            "the service listens on the node's network: give it a token with --token-file FILE after `--` "
            "(a file the nodes share; clients set $DFLASH_SERVICE_TOKEN_FILE to it), or --insecure"
        )
    if config.token_file is not None and not config.token_file.is_file():
        raise SettingsError(f"--token-file {config.token_file}: no such file (it must exist on the nodes)")
    return config
