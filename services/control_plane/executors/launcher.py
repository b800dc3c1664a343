"""The parent process of each local trainer: records its exit status and passes on one stop signal.

    python -m services.control_plane.executors.launcher --exit-file F -- python -m services.cli.main train ...

Why a parent at all: a control plane restarted while a trainer runs is not that trainer's parent
any more, so it cannot learn its exit status from the kernel. This launcher (the job's tracked
pid and process-group leader) writes the status to F when the trainer ends, whoever is watching.

Signals: the first SIGTERM (and the first SIGINT) is passed to the trainer, which checkpoints and
exits 143 (130). Later ones are dropped: the trainer takes a second signal as "die now, no
checkpoint", and a restarted control plane may repeat a cancel it cannot tell was delivered.
The hard stop is SIGKILL to the whole process group, which needs no forwarding.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType


def exit_status(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: launcher --exit-file F -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="launcher")
    parser.add_argument("--exit-file", type=Path, required=True)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]

    child: subprocess.Popen | None = None
    forwarded: set[int] = set()
    early: list[int] = []  # arrived before the trainer existed: delivered right after it does

    def forward_once(signum: int, _frame: FrameType | None) -> None:
        if signum in forwarded:
            return
        forwarded.add(signum)
        if child is None:
            early.append(signum)
        else:
            child.send_signal(signum)

    # Handlers first, so no stop request can slip between the trainer's start and them (exec
    # gives the trainer default handlers again; it installs its own).
    signal.signal(signal.SIGTERM, forward_once)
    signal.signal(signal.SIGINT, forward_once)
    child = subprocess.Popen(command)  # same process group: a SIGKILL to the group reaches it
    for signum in early:
        child.send_signal(signum)
    status = exit_status(child.wait())  # wait() resumes after each handled signal (PEP 475)
    write_atomically(args.exit_file, f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
