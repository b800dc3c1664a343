"""A resolved config handed to a child process whole, as one JSON argument.

The parent (the CLI, a launcher, an executor) has already applied every layer: field defaults <
YAML < environment < flags. The child reads that config and nothing else, so a DFLASH_* variable
it inherits cannot change what the parent decided. This is the one way a config crosses into
another process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from dflash_core.config_args import format_validation_error

ConfigT = TypeVar("ConfigT", bound=BaseModel)

HANDOVER_FLAG = "--resolved-config"


def handover_args(config: BaseModel) -> list[str]:
    """The child's arguments: `--resolved-config '<the config as JSON>'` (paths only, never a secret)."""
    return [HANDOVER_FLAG, config.model_dump_json()]


def config_from_handover(config_cls: type[ConfigT], argv: Sequence[str]) -> ConfigT:
    """The config `handover_args` wrote; a clear SystemExit for anything else."""
    if len(argv) != 2 or argv[0] != HANDOVER_FLAG:
        raise SystemExit(
            f"error: expected `{HANDOVER_FLAG} JSON` (a {config_cls.__name__} resolved by the parent "
            f"process), got {list(argv)!r}"
        )
    try:
        return config_cls.model_validate_json(argv[1])
    except ValidationError as exc:
        raise SystemExit(format_validation_error(exc)) from None
