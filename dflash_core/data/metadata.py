"""`dflash_data.json`: what made a prepared data folder, as one typed model, written and read here.

    write_metadata(folder, PreparedMetadata(...))     # prepare-data, last file of the folder
    meta = read_metadata(folder)                      # DataError unless it is prepare-data's

Older files: a key added after format 1 first shipped is defaulted (logged); a key every version
wrote is required (a file without it was not written by prepare-data, or was edited: DataError
naming the keys); a key this release does not know (a newer dflash's addition; changes it cannot
read bump `format_version` instead) is dropped, logged. A newer `format_version` is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dflash_core.data.formats import DataError

logger = logging.getLogger(__name__)

FORMAT = "dflash-prepared-data"
FORMAT_VERSION = 1
METADATA_FILE = "dflash_data.json"


class SourceCounts(BaseModel):
    """What happened to one `--data` entry: rows_read = written + skipped + unused."""

    model_config = ConfigDict(extra="ignore")

    spec: str
    rows_read: int
    rows_written: int
    rows_truncated: int
    rows_unused: int = Field(description="Usable or untried rows left out because max_samples was reached.")
    rows_skipped: dict[str, int] = Field(description="Skipped rows by kind.")


class PreparedMetadata(BaseModel):
    """The contents of `dflash_data.json`. Fields with a default are those older files may lack."""

    model_config = ConfigDict(extra="ignore")

    format: Literal["dflash-prepared-data"] = FORMAT
    format_version: int = FORMAT_VERSION
    model: str = Field(description="The --model whose tokenizer and chat template made the rows.")
    tokenizer_fingerprint: str = Field(description="The trainer refuses data of another tokenizer.")
    # None when no chat template exists (every source pre-tokenized), or in files older than the key.
    chat_template_sha256: str | None = None
    vocab_size: int = Field(description="Length of token_freq.pt.")
    seq_length: int
    assistant_only_loss: bool = True
    min_supervised_tokens: int
    max_samples: int | None
    seed: int
    rows_written: int
    rows_skipped: dict[str, int] = {}
    rows_truncated: int = 0
    total_tokens: int
    supervised_tokens: int
    sources: list[SourceCounts] = []
    columns: list[str]
    created: str = Field(description="UTC time of writing, ISO 8601.")
    # Each from its own writer (Regenerator.metadata(), SelfPrompter.metadata(), mix_statistics()).
    regenerated: dict[str, Any] | None = None
    self_prompted: dict[str, Any] | None = None
    mix: dict[str, Any] | None = None


def write_metadata(folder: Path, metadata: PreparedMetadata) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")


def read_metadata(folder: Path) -> PreparedMetadata:
    """The metadata of a prepare-data folder; `DataError` (saying what to do) for anything else."""
    if not folder.is_dir():
        raise DataError(f"prepared data folder {folder} does not exist")
    path = folder / METADATA_FILE
    if not path.is_file():
        raise DataError(
            f"{folder} is not a `dflash prepare-data` output (no {METADATA_FILE}); "
            f"run `dflash prepare-data --output {folder}` first"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{path} is not prepare-data metadata (format != {FORMAT!r})")
    version = raw.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(
            f"{folder} was written in data format {version!r}; this dflash reads up to {FORMAT_VERSION}. "
            "Upgrade dflash or re-run prepare-data."
        )
    _log_differences(path, raw)
    try:
        return PreparedMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DataError(
            f"{path} is not metadata this dflash can read ({problems}); re-run `dflash prepare-data`"
        ) from exc


def _log_differences(path: Path, raw: dict[str, Any]) -> None:
    fields = PreparedMetadata.model_fields
    for key in sorted(set(fields) - set(raw)):
        if not fields[key].is_required():
            logger.info("%s has no %r (older format); assuming %r", path, key, fields[key].default)
    for key in sorted(set(raw) - set(fields)):
        logger.info("%s has %r, which this dflash does not know (newer format?); ignored", path, key)
