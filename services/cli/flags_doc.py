"""Writes the README's flag tables from the job configs, so the docs never drift from `--help`.

python -m services.cli.flags_doc --write README.md   # regenerate
python -m services.cli.flags_doc --check README.md   # exit 1 if stale (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from dflash_core.config import (
    DemoConfig,
    GenerateOfflineConfig,
    PrepareDataConfig,
    ServeHiddenStatesConfig,
    TrainConfig,
)
from dflash_core.config_args import config_sections, help_text, strip_optional

BEGIN = "<!-- BEGIN GENERATED FLAGS (python -m services.cli.flags_doc --write README.md) -->"
END = "<!-- END GENERATED FLAGS -->"
COMMANDS: list[tuple[str, type[BaseModel]]] = [
    ("dflash prepare-data", PrepareDataConfig),
    ("dflash serve-hidden-states", ServeHiddenStatesConfig),
    ("dflash generate-offline", GenerateOfflineConfig),
    ("dflash train", TrainConfig),
    ("dflash demo", DemoConfig),
]


def _type_name(annotation: object) -> str:
    annotation = strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " / ".join(f"`{choice}`" for choice in typing.get_args(annotation))
    if origin is list:
        return f"{_type_name(typing.get_args(annotation)[0])} ..."
    return "path" if annotation is Path else getattr(annotation, "__name__", str(annotation))


def flag_tables() -> str:
    parts: list[str] = []
    for command, config_cls in COMMANDS:
        parts.append(f"### `{command}`\n\n| flag | type | meaning |\n|---|---|---|")
        sections = config_sections(config_cls)
        for title, _, names in sections:
            if len(sections) > 1:
                parts.append(f"| **{title}** | | |")
            for name in names:
                field = config_cls.model_fields[name]
                flag = "--" + name.replace("_", "-")
                meaning = help_text(field).replace("|", "\\|")
                parts.append(f"| `{flag}` | {_type_name(field.annotation)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


def render(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{flag_tables()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path)
    mode.add_argument("--check", type=Path)
    args = parser.parse_args(argv)
    path = args.write or args.check
    current = path.read_text()
    fresh = render(current)
    if args.write:
        path.write_text(fresh)
        return 0
    if fresh != current:
        print(f"{path}: the flag tables are stale; run python -m services.cli.flags_doc --write {path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
