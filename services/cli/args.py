"""Argparse flags generated from the pydantic job configs in `dflash_core.config`.

Each field becomes `--field-name` with the field's description as help text, so every default
and every word of `--help` is written once, on the config. Flags the user did not give are left
out of the parsed namespace (`argparse.SUPPRESS`), which lets pydantic apply its own defaults and
lets a YAML file (`--config`) sit between the defaults and the command line.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def strip_optional(annotation: Any) -> Any:
    """`int | None` -> `int`; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    group = parser.add_argument_group(config_cls.__name__, (config_cls.__doc__ or "").strip())
    for name, field in config_cls.model_fields.items():
        annotation = strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text(field)}
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


def config_from_args(config_cls: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """Build the config: field defaults < YAML file < command-line flags. Exits with a clear message."""
    values: dict[str, Any] = {}
    config_file: Path | None = getattr(args, "config_file", None)
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text())
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {config_file} must hold a mapping of {config_cls.__name__} fields")
        values.update(loaded)
    for name in config_cls.model_fields:
        positional = getattr(args, f"{name}_positional", None)
        if positional not in (None, []):
            values[name] = positional
        if name in vars(args):
            values[name] = getattr(args, name)
    try:
        return config_cls.model_validate(values)
    except ValidationError as exc:
        raise SystemExit(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the flag as the user typed it."""
    lines = [f"error: invalid {exc.title}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        flag = _flag(str(err["loc"][0])) if err["loc"] else "config"
        lines.append(f"  {flag} ({where}): {err['msg']}")
    return "\n".join(lines)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, those after the first bare `--`), for commands that hand some on (engines)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]
