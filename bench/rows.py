"""Result rows as every benchmark here writes them: printed, and appended to a JSON array file."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path


def emit_rows(
    results: dict[str, tuple[float, str]], *, config: str, device: str, out: Path | None
) -> list[dict]:
    """`results` maps metric -> (value, unit); rows are {"metric","value","unit","config","device","date"}."""
    date = dt.date.today().isoformat()
    rows = [
        {"metric": m, "value": round(v, 4), "unit": u, "config": config, "device": device, "date": date}
        for m, (v, u) in results.items()
    ]
    for row in rows:
        print(json.dumps(row))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        earlier = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps(earlier + rows, indent=1) + "\n")
    return rows
