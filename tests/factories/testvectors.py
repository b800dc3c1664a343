"""Where the DFlash oracle lives: speculators 0.9.0's outputs for one training forward (docs/architecture.md).

A copy ships in tests/fixtures/testvectors/dflash (1.7 MB) so every checkout, CI's included,
checks the drafter against it; DFLASH_TESTVECTORS points elsewhere (e.g. a newer set).
The files are missing only in a broken checkout, so that is an error, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

IN_REPO = Path(__file__).resolve().parents[1] / "fixtures" / "testvectors" / "dflash"


def testvectors_dir() -> Path:
    path = Path(os.environ.get("DFLASH_TESTVECTORS", IN_REPO))
    if not (path / "inputs.safetensors").is_file():
        raise FileNotFoundError(f"DFlash test vectors missing at {path}: the checkout is incomplete")
    return path
