"""Helpers for the deployment tests: the compose file as `docker-compose config` resolves it, the
Dockerfiles' instructions, and a check of a container's `dflash` command and variables against
the real CLI (there is no Docker engine here: commands are checked and run as plain processes)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from dflash_core.config_args import (
    ENV_SWITCH,
    RESERVED_ENV_PREFIXES,
    env_name,
    split_passthrough,
    switched_on,
)
from services.cli.flags_doc import COMMANDS
from services.cli.main import build_parser
from services.hidden_states.credentials import CREDENTIAL_ENVS

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILES = sorted(REPO.glob("services/*/Dockerfile"))
# The job configs whose fields DFLASH_<FIELD> variables set, by subcommand.
CONFIG_OF_SUBCOMMAND = {command.removeprefix("dflash "): config_cls for command, config_cls in COMMANDS}


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        raise RuntimeError("docker-compose is missing: `make deploy-env` installs Debian's package")
    return found


def compose_config(
    tmp_path: Path,
    *,
    variables: dict[str, str] | None = None,
    env_file: Path | None = None,
    compose_file: Path = COMPOSE_FILE,
) -> dict:
    """`docker-compose config` of the repo's compose file (or `compose_file`, resolved from the
    repo's folder): validated against compose's schema, variables substituted, every profile
    included. Only `variables` (and `env_file`) are seen: neither this process's environment nor
    a developer's `.env` leaks in. A file the schema refuses raises AssertionError with its error."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    result = subprocess.run(
        [
            docker_compose(),
            "--project-directory",
            str(REPO),
            "-f",
            str(compose_file),
            "--env-file",
            str(env_file),
            "config",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(variables or {})},
        timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"docker-compose config failed:\n{result.stderr}")
    return yaml.safe_load(result.stdout)


# ---------------------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    text: str  # the rest, continuation lines joined
    line: int


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, comments dropped and `\\` continuations joined."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if stripped.endswith("\\"):
            continue
        keyword, _, text = " ".join(pending).partition(" ")
        out.append(Instruction(keyword.upper(), text.strip(), start))
        pending = []
    return out


def exec_form(text: str) -> list[str]:
    """`["a", "b"]` -> ['a', 'b']; shell form is refused (signals would reach /bin/sh, not us)."""
    value = json.loads(text)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not an exec-form list: {text}")
    return value


def dockerfile_env(path: Path) -> dict[str, str]:
    """The runtime stage's ENV (the last stage's, `KEY=value` pairs)."""
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    env: dict[str, str] = {}
    for ins in instructions[last_from:]:
        if ins.keyword == "ENV":
            for pair in re.findall(r"(\S+?)=(\"[^\"]*\"|\S+)", ins.text):
                env[pair[0]] = pair[1].strip('"')
    return env


def dockerfile_entrypoint(path: Path) -> list[str]:
    (entry,) = [ins for ins in dockerfile_instructions(path) if ins.keyword == "ENTRYPOINT"]
    return exec_form(entry.text)


# ---------------------------------------------------------------------------- the real CLI


def cli_problems(argv: list[str], environment: dict[str, str] | None = None) -> list[str]:
    """What is wrong with running `dflash ARGV` with these variables; [] when the CLI takes it.

    The arguments go through the real parser (unknown subcommands, flags or choices fail as they
    would in the container). Every DFLASH_* variable must be one that the subcommand reads: a
    job-config field (DFLASH_<FIELD>, read only where DFLASH_CONFIG_FROM_ENV=1), a control-plane
    setting (DFLASH_CONTROL_PLANE_<NAME>) or a trainer-agent setting (DFLASH_AGENT_<NAME>). A
    misspelt variable would otherwise be ignored.
    """
    from services.agent.settings import AgentSettings
    from services.control_plane.settings import ControlPlaneSettings

    ours, passthrough = split_passthrough(list(argv))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(ours)
    except SystemExit:
        return [f"`dflash {' '.join(argv)}`: {stderr.getvalue().strip().splitlines()[-1]}"]
    problems = []
    if passthrough and not args.accepts_passthrough:
        problems.append(f"`dflash {args.command}` takes no arguments after `--`")
    settings_vars = {
        cls.model_config["env_prefix"] + name.upper()
        for cls in (ControlPlaneSettings, AgentSettings)
        for name in cls.model_fields
    } | set(CREDENTIAL_ENVS)
    config_cls = CONFIG_OF_SUBCOMMAND.get(args.command)
    job_vars = {env_name(name) for name in config_cls.model_fields} if config_cls else set()
    environment = environment or {}
    for variable in environment:
        if not variable.startswith("DFLASH_") or variable == ENV_SWITCH:
            continue
        if variable.startswith(RESERVED_ENV_PREFIXES):
            if variable not in settings_vars:
                problems.append(f"${variable}: no service setting or credential reads it")
        elif variable not in job_vars:
            problems.append(f"${variable}: `dflash {args.command}` has no such field")
        elif not switched_on(environment):
            problems.append(f"${variable}: ignored without ${ENV_SWITCH}=1")
    return problems
