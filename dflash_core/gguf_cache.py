"""GGUF verifiers converted once to a transformers folder, which every later load reads instead.

Why: transformers dequantizes a GGUF file on every load. For the embedded SmolLM2-135M that is
19 s on this project's 2-core CI machine and 36 s per process on the H200 host, paid by every
hidden-state service, trainer, evaluation and test that loads it (one quality run on the H200
loads it about nine times). The converted folder (config, float32 safetensors, tokenizer with
its chat template) loads in about a second.

- **Key:** the GGUF's resolved path, size and modification time, the transformers version
  (another version may dequantize or name things differently) and the folder's `LAYOUT`. A
  folder is used only when its marker file, written last, holds the same key: a half-written or
  stale folder is never read.
- **Atomic:** a conversion is written to a temporary folder beside the final one and renamed into
  place; when two processes convert at once, one rename wins and the other's folder is dropped.
- **Where:** `$DFLASH_CACHE_DIR`, else `$XDG_CACHE_HOME/dflash`, else `~/.cache/dflash`, under
  `gguf/`. `DFLASH_CACHE_DIR=off` turns the cache off.
- **Never a new failure:** any `OSError` (a read-only or full disk) logs one warning and the
  caller loads from the GGUF as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "dflash_gguf_conversion.json"
CACHE_ENV = "DFLASH_CACHE_DIR"
# How the folder is written; a new layout converts again. 2: a tied embedding is stored under the
# input embedding's name only (vLLM reads it from there; layout 1 kept it as lm_head.weight).
LAYOUT = 2


def cache_root() -> Path | None:
    """Where converted folders live; None when `DFLASH_CACHE_DIR=off`."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("off", "0", "") else Path(configured) / "gguf"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no $HOME and no passwd entry (an anonymous container user): no cache
            return None
    return Path(base) / "dflash" / "gguf"


def conversion_key(gguf: Path) -> dict[str, str | int]:
    """What the converted folder depends on."""
    import transformers

    resolved = gguf.resolve()
    stat = resolved.stat()
    return {
        "gguf": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
        "layout": LAYOUT,
    }


def converted_folder(gguf: Path, *, convert: Callable[[Path], None]) -> Path | None:
    """The converted folder of `gguf`, made with `convert(folder)` the first time; None if unavailable.

    `convert` writes the model and tokenizer (`save_pretrained`) into the folder it is given.
    """
    root = cache_root()
    if root is None:
        return None
    key = conversion_key(gguf)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = root / f"{gguf.stem}-{digest}"
    if _holds(final, key):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as exc:
        logger.warning("cannot cache the converted GGUF under %s (%s); loading %s directly", root, exc, gguf)
        return None
    try:
        logger.info("converting %s to a transformers folder once (%s)", gguf.name, final)
        convert(scratch)
        (scratch / MARKER).write_text(json.dumps(key, indent=1) + "\n")
        _move_into_place(scratch, final)
    except OSError as exc:
        logger.warning("cannot cache the converted GGUF at %s (%s); loading %s directly", final, exc, gguf)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final if _holds(final, key) else None


def _holds(folder: Path, key: dict[str, str | int]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == key
    except (OSError, ValueError):
        return False


def _move_into_place(scratch: Path, final: Path) -> None:
    """Rename `scratch` to `final`; a stale `final` is replaced, a complete one (another process's) kept."""
    # Not dflash_core.atomic_files.atomic_folder: that always swaps its folder in, and here another
    # process may already be loading a complete `final`; the cache is re-derivable, so no fsync.
    try:
        os.replace(scratch, final)
    except OSError:
        if _holds(final, json.loads((scratch / MARKER).read_text())):
            return  # another process finished the same conversion first
        shutil.rmtree(final, ignore_errors=True)  # a stale or half-written folder under the same name
        os.replace(scratch, final)
