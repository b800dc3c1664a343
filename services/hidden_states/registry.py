"""A folder of named hidden-state services: how services whose host is picked by a scheduler
(Slurm) tell the control plane, and the jobs it runs, where they are.

A service named NAME is the file `<folder>/NAME.endpoint`; its first line is `host:port`, any
further lines are notes for people (`# slurm job 1234 on gpu-07 since ...`). The batch script of
`dflash slurm-hidden-states` writes it once the service answers health checks and removes it
when the service stops; a job names the service as `registry:NAME` and the control plane puts
the address in its place when the job is submitted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from services.hidden_states.endpoints import parse_endpoint

logger = logging.getLogger(__name__)

SUFFIX = ".endpoint"
SCHEME = "registry:"
# Names end up in file names, Slurm job names and shell scripts: nothing that needs quoting.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Registered:
    name: str
    endpoint: str  # host:port, or the file's text when it is no address (listed as an error)
    problem: str | None = None


def check_name(name: str) -> str:
    """`name` when it can name a service; ValueError saying what a name may hold otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"service name {name!r}: use 1-63 letters, digits, '.', '_' or '-', the first a letter or digit"
        )
    return name


def entry_path(folder: Path, name: str) -> Path:
    return folder / f"{check_name(name)}{SUFFIX}"


def read_registry(folder: Path) -> dict[str, Registered]:
    """Every service registered in `folder`, by name; a missing folder registers none."""
    found: dict[str, Registered] = {}
    try:
        entries = sorted(folder.glob(f"*{SUFFIX}"))
    except OSError as exc:
        logger.warning("hidden-state registry %s: cannot list it (%s)", folder, exc)
        return found
    for path in entries:
        name = path.name.removesuffix(SUFFIX)
        if not NAME_PATTERN.fullmatch(name):
            continue  # not written by us (a name no script could have written)
        try:
            first = next((line.strip() for line in path.read_text().splitlines() if line.strip()), "")
        except OSError:
            continue  # removed between the listing and the read: the service just stopped
        try:
            found[name] = Registered(name, parse_endpoint(first))
        except ValueError as exc:
            found[name] = Registered(name, first or path.name, problem=f"{path}: {exc}")
    return found


def is_registry_name(endpoint: str) -> bool:
    return endpoint.strip().startswith(SCHEME)


def resolve(endpoints: list[str], folder: Path | None) -> list[str]:
    """`endpoints` with each `registry:NAME` replaced by the address NAME registered; ValueError
    naming the missing name and those registered."""
    if not any(is_registry_name(e) for e in endpoints):
        return endpoints
    if folder is None:
        raise ValueError(
            f"{next(e for e in endpoints if is_registry_name(e))!r} names a registered service, but this "
            "control plane has no registry: start it with --hidden-states-registry FOLDER"
        )
    registered = read_registry(folder)
    out = []
    for endpoint in endpoints:
        if not is_registry_name(endpoint):
            out.append(endpoint)
            continue
        name = endpoint.strip().removeprefix(SCHEME)
        entry = registered.get(name)
        if entry is None:
            known = ", ".join(sorted(registered)) or "none"
            raise ValueError(
                f"no hidden-state service is registered as {name!r} in {folder} (registered: {known})"
            )
        if entry.problem is not None:
            raise ValueError(entry.problem)
        out.append(entry.endpoint)
    return out
