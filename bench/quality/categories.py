"""tau per prompt category: a `dflash eval` JSON report mapped back to the `kind` of each prompt.

    dflash eval CKPT --prompts bench/quality/prompts.jsonl --output-json eval.json
    python bench/quality/categories.py eval.json [--prompts bench/quality/prompts.jsonl]

The report must hold per-prompt figures, `report["per_prompt"]`: one entry per evaluated prompt
with its `source` ("path:line", the 1-based line of the prompts file, as `load_prompts` names it),
`drafts` and `accepted_tokens`, and optionally `accepted_per_position` ([B-1] counts). A category's
tau is vLLM's mean acceptance length over the category's steps, 1 + accepted / drafts, the same
rule as the report's overall tau: a mean of per-prompt taus would weigh a 3-draft prompt like a
90-draft one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The categories of bench/quality/prompts.jsonl (field `kind`), in the file's interleaving order.
CATEGORIES = (
    "instruction",
    "writing",
    "reasoning",
    "maths",
    "code",
    "extraction",
    "roleplay",
    "multi_turn",
)
UNLABELLED = "(no kind)"


def tau_by_category(report: dict, prompts_path: Path) -> dict[str, dict]:
    """Per category of `prompts_path` (in the file's order): prompts, drafts, accepted tokens, tau,
    and acceptance per draft position when every prompt of the category reports it.

    Raises ValueError when the report has no per-prompt figures or names prompts that are not
    rows of `prompts_path` (figures mapped onto the wrong file would look plausible).
    """
    per_prompt = report.get("per_prompt")
    if not isinstance(per_prompt, list):
        raise ValueError(
            "the report has no per-prompt figures ('per_prompt': [{source, drafts, accepted_tokens}, ...]); "
            "only the overall tau can be read from it"
        )
    kinds = _kinds_by_line(prompts_path)
    totals: dict[str, dict[str, Any]] = {}
    for entry in per_prompt:
        kind = kinds.get(_line_of(entry["source"], prompts_path))
        if kind is None:
            raise ValueError(f"prompt {entry['source']!r} is not a row of {prompts_path}")
        total = totals.setdefault(kind, {"prompts": 0, "drafts": 0, "accepted_tokens": 0, "positions": []})
        total["prompts"] += 1
        total["drafts"] += int(entry["drafts"])
        total["accepted_tokens"] += int(entry["accepted_tokens"])
        total["positions"].append(entry.get("accepted_per_position"))
    order = list(dict.fromkeys(kinds.values()))
    return {kind: _summary(totals[kind]) for kind in order if kind in totals}


def _summary(total: dict[str, Any]) -> dict[str, Any]:
    drafts, accepted = total["drafts"], total["accepted_tokens"]
    out: dict[str, Any] = {
        "prompts": total["prompts"],
        "drafts": drafts,
        "accepted_tokens": accepted,
        "tau": 1.0 + accepted / drafts if drafts else None,  # no draft, no tau (as the report's null)
    }
    positions = total["positions"]
    # A rate over only some of the category's prompts would not be the category's: all or none.
    if positions and all(isinstance(p, list) for p in positions) and len({len(p) for p in positions}) == 1:
        counts = [sum(column) for column in zip(*positions, strict=True)]
        out["accepted_per_position"] = counts
        out["acceptance_per_position"] = [c / drafts if drafts else None for c in counts]
    return out


def _kinds_by_line(prompts_path: Path) -> dict[int, str]:
    """1-based line -> kind, numbered as `load_prompts` numbers a JSONL file (blank lines counted)."""
    kinds: dict[int, str] = {}
    for line, raw in enumerate(prompts_path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            row = json.loads(raw)
            kinds[line] = row.get("kind", UNLABELLED) if isinstance(row, dict) else UNLABELLED
    return kinds


def _line_of(source: str, prompts_path: Path) -> int | None:
    """The line of a "path:line" source, or None when it names another file or no line."""
    path, _, line = source.rpartition(":")
    # Reports made elsewhere hold other absolute paths: the file name has to agree, not the folder.
    if Path(path).name != prompts_path.name or not line.isdigit():
        return None
    return int(line)


def format_categories(categories: dict[str, dict]) -> str:
    """A plain-text table: one row per category, with its acceptance at each draft position."""
    lines = [
        f"{'category':<14}{'prompts':>8}{'drafts':>8}{'accepted':>10}{'tau':>8}  acceptance per position"
    ]
    for kind, row in categories.items():
        tau = "-" if row["tau"] is None else f"{row['tau']:.3f}"
        rates = " ".join("-" if r is None else f"{r:.2f}" for r in row.get("acceptance_per_position", []))
        lines.append(
            f"{kind:<14}{row['prompts']:>8}{row['drafts']:>8}{row['accepted_tokens']:>10}{tau:>8}  {rates}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("report", type=Path, help="A `dflash eval --output-json` report.")
    parser.add_argument("--prompts", type=Path, default=Path(__file__).resolve().parent / "prompts.jsonl")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    args = parser.parse_args(argv)
    categories = tau_by_category(json.loads(args.report.read_text()), args.prompts)
    print(json.dumps(categories, indent=2) if args.json else format_categories(categories))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
