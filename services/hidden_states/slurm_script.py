"""The Slurm batch script that keeps a hidden-state service up on a GPU node and registers it.

`dflash slurm-hidden-states` fills in a `SlurmService` and writes `render(service)`; the script
is meant to be read, edited and resubmitted by hand (`sbatch FILE`). What it does, in order:
start `dflash serve-hidden-states` in the background on the node; wait until gRPC health answers
SERVING at the address it will advertise; write `<registry>/<name>.endpoint` (registry.py);
wait for the service. On SIGTERM (scancel, or `--signal` before the time limit) it removes its
entry first, so no new job is pointed at a service that is going, then lets the service drain.

Outside Slurm the script runs under plain bash too (the tests do so): SLURM_* variables are only
read for the notes in the entry, and DFLASH_BIND_HOST / DFLASH_ADVERTISE_HOST override the
address bound and the one registered (a node's fast-network name, or 127.0.0.1 in a test).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from services.hidden_states.registry import SUFFIX


@dataclass(frozen=True, kw_only=True)
class SlurmService:
    name: str  # registered as <registry>/<name>.endpoint
    registry: Path  # a folder every node and the control plane see (shared file system)
    serve_args: list[str]  # `dflash serve-hidden-states` arguments, model and engine args included
    port: int = 8000
    payload_port: int = 8001
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem: str | None = None
    time: str | None = None
    output: str = "%x-%j.out"  # Slurm's pattern: job name and job id
    dflash: str = "dflash"  # the command that runs our CLI on the node
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv)
    stop_notice_s: int = 120  # SIGTERM this long before the time limit (`--signal`)
    health_every_s: int = 5


def sbatch_lines(service: SlurmService) -> list[str]:
    options = [
        ("job-name", f"dflash-hs-{service.name}"),
        ("partition", service.partition),
        ("account", service.account),
        ("nodes", "1"),
        ("ntasks", "1"),
        ("gpus-per-node", str(service.gpus_per_node) if service.gpus_per_node else None),
        ("cpus-per-task", str(service.cpus_per_task)),
        ("mem", service.mem),
        ("time", service.time),
        ("output", service.output),
        # To the batch shell only (B:): it deregisters, then forwards the signal to the service.
        ("signal", f"B:TERM@{service.stop_notice_s}"),
    ]
    return [f"#SBATCH --{key}={value}" for key, value in options if value is not None]


def flag_groups(args: list[str]) -> list[list[str]]:
    """`args` cut before each flag, one flag and its values per line of the script."""
    groups: list[list[str]] = []
    for arg in args:
        if not groups or arg.startswith("-"):
            groups.append([])
        groups[-1].append(arg)
    return groups


def render(service: SlurmService) -> str:
    q = shlex.quote
    serve = "\n    ".join(" ".join(q(arg) for arg in group) for group in flag_groups(service.serve_args))
    setup = "\n".join(service.setup) if service.setup else "# (none: `dflash` is on PATH)"
    return f"""#!/bin/bash
# A dflash hidden-state service on one node, registered as {service.name!r} for jobs to name
# (`registry:{service.name}` in a job's hidden_states_endpoint; docs/deployment.md).
# Written by `dflash slurm-hidden-states`; edit freely and resubmit with `sbatch THIS_FILE`.
{chr(10).join(sbatch_lines(service))}

set -uo pipefail

NAME={q(service.name)}
REGISTRY={q(str(service.registry))}
PORT={service.port}
PAYLOAD_PORT={service.payload_port}
DFLASH=${{DFLASH:-{q(service.dflash)}}}
BIND_HOST=${{DFLASH_BIND_HOST:-0.0.0.0}}
ADVERTISE_HOST=${{DFLASH_ADVERTISE_HOST:-$(hostname -f 2>/dev/null || hostname)}}
SERVE_ARGS=(
    {serve}
)

# Environment of the node
{setup}

ENTRY="$REGISTRY/$NAME{SUFFIX}"
ADDRESS="$ADVERTISE_HOST:$PORT"

deregister() {{
    # Only our own entry: a newer copy of this service may have registered under the same name.
    if [ -f "$ENTRY" ] && [ "$(head -n 1 "$ENTRY")" = "$ADDRESS" ]; then
        rm -f "$ENTRY"
        echo "deregistered $NAME ($ADDRESS)"
    fi
}}

stop() {{
    trap - TERM INT
    deregister
    echo "stopping the service (pid $SERVICE_PID): it drains its calls, then exits"
    kill -TERM "$SERVICE_PID" 2>/dev/null
    wait "$SERVICE_PID"
    exit $?
}}

mkdir -p "$REGISTRY" || exit 1
# These flags go first: SERVE_ARGS may end with `-- <vLLM engine arguments>`.
"$DFLASH" serve-hidden-states --host "$BIND_HOST" --port "$PORT" --payload-port "$PAYLOAD_PORT" \\
    "${{SERVE_ARGS[@]}}" &
SERVICE_PID=$!
trap stop TERM INT

# Registered only once it answers health at the address jobs will dial (loading takes minutes).
until "$DFLASH" healthcheck grpc "$ADDRESS" >/dev/null 2>&1; do
    if ! kill -0 "$SERVICE_PID" 2>/dev/null; then
        wait "$SERVICE_PID"
        status=$?
        echo "the service exited with status $status before it was ready; nothing registered" >&2
        exit "$status"
    fi
    sleep {service.health_every_s}
done

tmp="$ENTRY.tmp.$$"
{{
    echo "$ADDRESS"
    echo "# slurm job ${{SLURM_JOB_ID:-none}} on ${{SLURMD_NODENAME:-$(hostname)}} since $(date -u +%FT%TZ)"
}} > "$tmp" && mv -f "$tmp" "$ENTRY" || exit 1
echo "registered $NAME as $ADDRESS in $REGISTRY"

wait "$SERVICE_PID"
status=$?
deregister
exit "$status"
"""
