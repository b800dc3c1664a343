"""Flags for the long-running services' settings (pydantic-settings classes), one per field.

The services (`dflash control-plane`, `dflash trainer-agent`) read each setting from a flag,
else from an environment variable (the class's env_prefix + the field's name), else the default.
Flags the user did not give are left out of the namespace, so the variables still apply.
Secret fields (typed SecretStr) are never flags: `ps` shows a process's command line to everyone
on the host.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretBytes, SecretStr, ValidationError
from pydantic_settings import BaseSettings

from dflash_core.config_args import format_validation_error, strip_optional

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def secret_fields(settings_cls: type[BaseSettings]) -> set[str]:
    """The fields that hold a secret: set only from a file or an environment variable."""
    fields = settings_cls.model_fields.items()
    return {name for name, field in fields if strip_optional(field.annotation) in (SecretStr, SecretBytes)}


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[BaseSettings], *, title: str
) -> None:
    group = parser.add_argument_group(title)
    prefix = settings_cls.model_config.get("env_prefix", "")
    secret = secret_fields(settings_cls)
    for name, field in settings_cls.model_fields.items():
        if name in secret:
            continue
        annotation = strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        default = field.get_default(call_default_factory=True)
        shown = "(required)" if field.is_required() else f"(default: {default})"
        kwargs["help"] = f"{field.description} {shown} [${prefix}{name.upper()}]"
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        # everything else is text, parsed by the settings' validators (`--gpus 0,1,2`)
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def settings_from_args(settings_cls: type[SettingsT], args: argparse.Namespace) -> SettingsT | None:
    """The settings (flags > variables > defaults); None once the user has been shown what is wrong
    (the command then exits 2)."""
    secret = secret_fields(settings_cls)
    names = [name for name in settings_cls.model_fields if name not in secret and name in vars(args)]
    given = {name: getattr(args, name) for name in names}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        print(format_validation_error(exc))
        return None
