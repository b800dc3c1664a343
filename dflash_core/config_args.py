"""Argparse flags generated from the pydantic job configs in `dflash_core.config`.

Each field becomes `--field-name` with the field's description as help text, so every default
and every word of `--help` is written once, on the config. Flags the user did not give are left
out of the parsed namespace (`argparse.SUPPRESS`), which lets pydantic apply its own defaults and
lets a YAML file (`--config`) and the environment sit between the defaults and the command line.

Precedence: field defaults < YAML file < environment < flags. Where `DFLASH_CONFIG_FROM_ENV=1`,
each field `name` is also read from the variable `DFLASH_<NAME>` (`DFLASH_TARGET_LAYER_IDS="2 18
33"`, `DFLASH_MODEL=Qwen/Qwen3-8B`), which is how containers are configured (docker-compose.yml).
The layer is opt-in so that a variable left in a shell or a service's environment never changes
a job quietly (without the switch, set variables are named in a warning and ignored):
- lists take comma- or space-separated items (`2,18,33`);
- booleans take 1/0, true/false, yes/no, on/off;
- an empty variable counts as unset (compose passes `${VAR:-}` through as empty);
- a bad value is an error naming the variable.
Variables under the services' own prefixes (`DFLASH_CONTROL_PLANE_*`, `DFLASH_AGENT_*`) are never
read as job-config fields, although `TrainConfig.control_plane_token_file` would spell
DFLASH_CONTROL_PLANE_TOKEN_FILE: that one is the control plane's own `--token-file`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

ConfigT = TypeVar("ConfigT", bound=BaseModel)

ENV_PREFIX = "DFLASH_"
# The services' pydantic-settings prefixes (control plane, trainer agent) and the hidden-state
# service's credentials (services/hidden_states/credentials.py): their variables are theirs.
RESERVED_ENV_PREFIXES = ("DFLASH_CONTROL_PLANE_", "DFLASH_AGENT_", "DFLASH_SERVICE_")
# The switch of the environment layer (1/true/yes/on).
ENV_SWITCH = "DFLASH_CONFIG_FROM_ENV"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

logger = logging.getLogger(__name__)


def strip_optional(annotation: Any) -> Any:
    """`int | None` -> `int`, and `Annotated[T, rule]` -> `T` (the rule is pydantic's to run)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(field_name: str) -> str | None:
    """The variable that sets this job-config field (`block_size` -> DFLASH_BLOCK_SIZE); None if reserved."""
    name = ENV_PREFIX + field_name.upper()
    return None if name.startswith(RESERVED_ENV_PREFIXES) else name


def help_text(field: Any) -> str:
    text = field.description or ""
    default = field.get_default(call_default_factory=True)
    if default is PydanticUndefined:
        return f"{text} (required)".strip()
    if isinstance(default, list):
        default = " ".join(map(str, default)) or "[]"
    return f"{text} (default: {default})".strip()


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls: type[BaseModel], *, positional: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of `config_cls`; fields in `positional` may also be given positionally."""
    groups = {}
    for title, description, names in config_sections(config_cls):
        group = parser.add_argument_group(title, description)
        groups.update(dict.fromkeys(names, group))
    for name, field in config_cls.model_fields.items():
        group = groups[name]
        annotation = strip_optional(field.annotation)
        variable = env_name(name)
        shown = help_text(field) + (f" [${variable}]" if variable else "")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": shown}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            (item,) = typing.get_args(annotation)
            if typing.get_origin(item) is Literal:  # a list of choices (--report-to jsonl tensorboard)
                choices = typing.get_args(item)
                kwargs.update(nargs="+", choices=choices, type=type(choices[0]))
            else:
                kwargs.update(nargs="+", type=item)
        elif origin is Literal:
            choices = typing.get_args(annotation)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
        else:
            raise TypeError(f"{config_cls.__name__}.{name}: no CLI mapping for {annotation!r}")
        if name in positional:
            nargs = kwargs.pop("nargs", "?")
            group.add_argument(
                f"{name}_positional",
                nargs="?" if nargs != "+" else "*",
                default=argparse.SUPPRESS,
                type=kwargs.get("type"),
                metavar=name.upper(),
                help=f"same as {_flag(name)}",
            )
        group.add_argument(_flag(name), **kwargs)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        dest="config_file",
        help="YAML file with these fields; flags given on the command line override it.",
    )


def config_sections(config_cls: type[BaseModel]) -> list[tuple[str, str | None, list[str]]]:
    """(title, description, field names) of each section `config_cls` is built from, in the order
    its class lists them; the config's own fields come first, titled by its command."""
    sections = []
    for klass in config_cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)):
            continue
        inherited = {name for base in klass.__bases__ for name in getattr(base, "model_fields", {})}
        own = [name for name in klass.model_fields if name not in inherited]
        if not own:
            continue
        doc = (klass.__doc__ or "").strip()
        if klass is config_cls:  # its docstring starts "`dflash <command>`: what it does"
            sections.append((doc.split(":", 1)[0] or klass.__name__, doc, own))
        else:
            sections.append((doc.splitlines()[0] if doc else klass.__name__, None, own))
    return sections


def config_from_args(
    config_cls: type[ConfigT], args: argparse.Namespace, *, environ: Mapping[str, str] | None = None
) -> ConfigT:
    """Build the config: field defaults < YAML file < DFLASH_<NAME> variables < command-line flags.

    Exits with a clear message that names the flag, or the variable when the value came from one.
    """
    values: dict[str, Any] = {}
    config_file: Path | None = getattr(args, "config_file", None)
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text())
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {config_file} must hold a mapping of {config_cls.__name__} fields")
        values.update(loaded)
    environ = os.environ if environ is None else environ
    from_env: dict[str, Any] = {}
    if switched_on(environ):
        from_env = env_values(config_cls, environ)
    else:
        _warn_of_ignored(config_cls, environ)
    values.update(from_env)
    sources = {name: f"${env_name(name)}" for name in from_env}
    for name in config_cls.model_fields:
        positional = getattr(args, f"{name}_positional", None)
        if positional not in (None, []):
            values[name] = positional
            sources.pop(name, None)
        if name in vars(args):
            values[name] = getattr(args, name)
            sources.pop(name, None)
    try:
        return config_cls.model_validate(values)
    except ValidationError as exc:
        raise SystemExit(format_validation_error(exc, sources=sources)) from None


def switched_on(environ: Mapping[str, str]) -> bool:
    """Whether DFLASH_<NAME> variables set job-config fields in this environment."""
    return environ.get(ENV_SWITCH, "").strip().lower() in _TRUE


def _warn_of_ignored(config_cls: type[BaseModel], environ: Mapping[str, str]) -> None:
    variables = (env_name(name) for name in config_cls.model_fields)
    ignored = [v for v in variables if v is not None and environ.get(v, "").strip()]
    if ignored:
        logger.warning("ignored %s: job-config variables are read where %s=1", ", ".join(ignored), ENV_SWITCH)


def env_values(config_cls: type[BaseModel], environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields set by DFLASH_<NAME> variables, as text (lists split, booleans parsed)."""
    values: dict[str, Any] = {}
    for name, field in config_cls.model_fields.items():
        variable = env_name(name)
        text = environ.get(variable, "").strip() if variable else ""
        if not text:
            continue
        annotation = strip_optional(field.annotation)
        if annotation is bool:
            if text.lower() not in (*_TRUE, *_FALSE):
                raise SystemExit(f"error: ${variable}={text!r}: expected one of {', '.join(_TRUE + _FALSE)}")
            values[name] = text.lower() in _TRUE
        elif typing.get_origin(annotation) is list:
            values[name] = [item for item in re.split(r"[,\s]+", text) if item]
        else:
            values[name] = text  # pydantic converts and checks it like a YAML value
    return values


def format_validation_error(exc: ValidationError, *, sources: Mapping[str, str] | None = None) -> str:
    """One line per problem, naming the flag as the user typed it (or the variable that set it)."""
    lines = [f"error: invalid {exc.title}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = (sources or {}).get(field) or (_flag(field) if field else "config")
        lines.append(f"  {flag} ({where}): {err['msg']}")
    return "\n".join(lines)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, those after the first bare `--`), for commands that hand some on (engines)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]
