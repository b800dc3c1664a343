"""`dflash prepare-data`: read sources, tokenize with the chat template, filter, shuffle and write.

The output folder is a Hugging Face `datasets` folder (`Dataset.save_to_disk`) with columns

    input_ids  list[int32]   the rendered conversation, truncated to `seq_length`
    loss_mask  list[int8]    1 = the drafter is trained to predict this token (assistant replies)
    source     str           the `--data` entry the row came from

plus `token_freq.pt` (int64 tensor [vocab_size]: how often each token id sits at a loss-mask
position, i.e. the tokens a drafter must predict; it picks the reduced draft vocabulary) and
`dflash_data.json` (what made the data: model, tokenizer fingerprint, chat template sha256, counts,
and the mix: rows per source, distinct prompts and 4-grams, prompt and reply length histograms;
the typed model `PreparedMetadata`, written and read only by metadata.py). The trainer refuses
data whose tokenizer fingerprint differs from its verifier's.

Order of work: parse every source, shuffle all records with `seed`, then tokenize in that order
until `max_samples` rows are kept, so `--max-samples 5000` of ShareGPT does not tokenize 120k
conversations. Bad rows are skipped, counted by kind, and the first few reported with file, line
and reason; a source that yields no usable row at all is a `DataError`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dflash_core.atomic_files import atomic_folder
from dflash_core.config import SELF_DATA, PrepareDataConfig
from dflash_core.data.formats import Conversation, DataError, RowError, TokenizedRow, read_source
from dflash_core.data.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    PreparedMetadata,
    SourceCounts,
    read_metadata,
    write_metadata,
)
from dflash_core.data.mix_stats import mix_statistics
from dflash_core.data.regenerate import Regenerator
from dflash_core.data.self_prompt import SelfPrompter
from dflash_core.data.templates import (
    chat_template_sha256,
    check_tokenizer,
    control_token_ids,
    tokenize_conversations,
    truncate,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "TOKEN_FREQ_FILE",
    "DataError",
    "PrepareReport",
    "PreparedMetadata",
    "SourceReport",
    "count_supervised_tokens",
    "load_prepared",
    "load_token_freq",
    "prepare_data",
]

logger = logging.getLogger(__name__)

TOKEN_FREQ_FILE = "token_freq.pt"
COLUMNS = ("input_ids", "loss_mask", "source")
FIRST_ERRORS = 10  # skipped rows reported one by one (per source); the rest are only counted
CHUNK = 128  # conversations per tokenizer call (per worker)

Record = Conversation | TokenizedRow


@dataclass
class SourceReport:
    """What happened to one `--data` entry: rows_read = written + skipped + unused."""

    spec: str
    rows_read: int = 0
    rows_written: int = 0
    rows_truncated: int = 0
    # Usable or untried rows left out because `max_samples` was reached.
    rows_unused: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_errors: list[RowError] = field(default_factory=list)
    # The first skipped row of each kind: a rare cause stays visible behind a common one.
    example_errors: dict[str, RowError] = field(default_factory=dict)

    def skip(self, error: RowError) -> None:
        self.skipped[error.kind] += 1
        self.example_errors.setdefault(error.kind, error)
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(error)
            logger.warning("skipped %s", error)

    def counts(self) -> SourceCounts:
        """The counts, for the metadata (the skipped rows themselves stay in this report)."""
        return SourceCounts.model_validate({**vars(self), "rows_skipped": dict(sorted(self.skipped.items()))})


@dataclass
class PrepareReport:
    """The outcome of `prepare_data`: counts, the first skipped rows, and the metadata written."""

    output: Path
    rows_written: int
    rows_skipped: dict[str, int]
    total_tokens: int
    supervised_tokens: int
    sources: list[SourceReport]
    metadata: PreparedMetadata

    @property
    def first_errors(self) -> list[RowError]:
        return [e for s in self.sources for e in s.first_errors]

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints them)."""
        skipped = sum(self.rows_skipped.values())
        lines = [
            f"wrote {self.rows_written} rows ({self.total_tokens} tokens, "
            f"{self.supervised_tokens} supervised) to {self.output}",
        ]
        for s in self.sources:
            lines.append(
                f"  {s.spec}: read {s.rows_read}, written {s.rows_written} ({s.rows_truncated} truncated), "
                f"skipped {sum(s.skipped.values())}, unused {s.rows_unused}"
            )
        if skipped:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.rows_skipped.items()))
            lines.append(f"  skipped {skipped} rows: {kinds}")
            lines.extend(f"    {e}" for e in self.first_errors[:5])
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tokenization (optionally in worker processes)
# ---------------------------------------------------------------------------------------------

# Per-process state, set once per worker (or here when num_proc == 1), so the tokenizer is
# pickled once per worker rather than with every chunk. A pool of our own rather than
# `datasets.map(num_proc=...)`: rows are asked for a batch at a time (max_samples, regeneration
# rounds), and map was 1.5x slower on all rows at once, 2.3x called per batch
# (docs/benchmarks.md, "prepare-data's tokenizer workers").
_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Any, assistant_only_loss: bool, vocab_size: int) -> None:
    # Positional on purpose: ProcessPoolExecutor passes `initargs` positionally.
    _worker.update(
        tokenizer=tokenizer,
        assistant_only_loss=assistant_only_loss,
        vocab_size=vocab_size,
        control_ids=control_token_ids(tokenizer),
    )


def _process_chunk(records: list[Record]) -> list[TokenizedRow | RowError]:
    """Tokenize conversations (untruncated: the caller counts truncation) and check token rows."""
    conversations = [r for r in records if isinstance(r, Conversation)]
    try:
        tokenized = iter(
            tokenize_conversations(
                conversations,
                tokenizer=_worker["tokenizer"],
                seq_length=None,
                assistant_only_loss=_worker["assistant_only_loss"],
                control_ids=_worker["control_ids"],
            )
        )
    except Exception as exc:  # a tokenizer edge case must cost its chunk's rows, never the run
        reason = f"tokenizer failed on this chunk: {type(exc).__name__}: {exc}"
        tokenized = iter([RowError(c.source, c.line, reason, "tokenize_error") for c in conversations])
    vocab_size = _worker["vocab_size"]
    return [
        next(tokenized) if isinstance(r, Conversation) else _check_token_ids(r, vocab_size=vocab_size)
        for r in records
    ]


def _check_token_ids(row: TokenizedRow, *, vocab_size: int) -> TokenizedRow | RowError:
    top = max(row.input_ids)
    if top >= vocab_size:
        # An id past the embedding would crash the verifier mid-training, hours in.
        reason = f"token id {top} is out of range for vocab size {vocab_size}"
        return RowError(row.source, row.line, reason, "bad_token_ids")
    return row


Tokenize = Callable[[list[Record]], Iterator[TokenizedRow | RowError]]


@contextmanager
def _tokenizer_pool(*, tokenizer: Any, config: PrepareDataConfig, vocab_size: int) -> Iterator[Tokenize]:
    """A function tokenizing a list of records in order: in-process, or over `num_proc` workers."""
    init_args = (tokenizer, config.assistant_only_loss, vocab_size)
    if config.num_proc == 1:
        _init_worker(*init_args)
        yield lambda records: iter(_process_chunk(records))
        return
    with ProcessPoolExecutor(config.num_proc, initializer=_init_worker, initargs=init_args) as pool:

        def tokenize(records: list[Record]) -> Iterator[TokenizedRow | RowError]:
            chunks = [records[i : i + CHUNK] for i in range(0, len(records), CHUNK)]
            return (row for chunk in pool.map(_process_chunk, chunks) for row in chunk)

        yield tokenize


def _regenerating(tokenize: Tokenize, regenerate: Regenerator) -> Tokenize:
    """Rewrite a batch's assistant turns with the verifier's replies, then tokenize what is left.

    Self-written conversations pass as they are: their replies are the verifier's already.
    """

    def run(records: list[Record]) -> Iterator[TokenizedRow | RowError]:
        others = iter(regenerate([r for r in records if r.source != SELF_DATA]))
        rewritten = [r if r.source == SELF_DATA else next(others) for r in records]
        tokenized = tokenize([r for r in rewritten if not isinstance(r, RowError)])
        return iter([r if isinstance(r, RowError) else next(tokenized) for r in rewritten])

    return run


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def prepare_data(
    config: PrepareDataConfig,
    *,
    tokenizer: Any,
    tokenizer_fingerprint: str,
    vocab_size: int | None = None,
    regenerate: Regenerator | None = None,
    self_prompter: SelfPrompter | None = None,
) -> PrepareReport:
    """Tokenize `config.data` with `tokenizer`'s chat template and write the dataset to `config.output`.

    `tokenizer_fingerprint` identifies the tokenizer (the trainer compares it with its verifier's).
    `vocab_size` is the length of `token_freq.pt`: pass the verifier's embedding rows when they
    exceed `len(tokenizer)` (Qwen3: 151936 rows, 151669 tokens); default `len(tokenizer)`.
    `regenerate` (built from `config.regenerate_with` by the CLI) rewrites the assistant turns of
    the rows tried, just before they are tokenized; its settings and counts go to the metadata.
    `self_prompter` writes the conversations of `--data self`; they are all kept (they were paid
    for), other sources fill the rest of `max_samples`, and the rows are shuffled together.
    Raises `DataError` for an unusable source or output folder.
    """
    output = Path(config.output)
    _check_output(output)
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    if vocab < len(tokenizer):
        raise DataError(f"vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")

    reports = {spec: SourceReport(spec) for spec in dict.fromkeys(config.data)}  # duplicates read once
    records = _read_sources(reports)
    if any(isinstance(r, Conversation) for r in records):
        check_tokenizer(tokenizer)
    random.Random(config.seed).shuffle(records)
    # Written after every other source parsed: a broken file fails the run before generation.
    written = _self_written(reports, self_prompter)
    records = written + records
    with _tokenizer_pool(tokenizer=tokenizer, config=config, vocab_size=vocab) as tokenize:
        if regenerate is not None:
            tokenize = _regenerating(tokenize, regenerate)
        rows, untried = _select_rows(
            records,
            tokenize=tokenize,
            config=config,
            reports=reports,
            regenerate_round=regenerate.round_size if regenerate is not None else None,
        )
        for report in reports.values():
            if report.rows_written == 0:
                _prove_usable(report, untried=untried, tokenize=tokenize, config=config)

    if written:
        random.Random(config.seed).shuffle(rows)  # self-written rows came first
    token_freq = count_supervised_tokens(rows, vocab_size=vocab)
    metadata = _metadata(
        config,
        rows=rows,
        reports=list(reports.values()),
        token_freq=token_freq,
        vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fingerprint,
        template_sha256=_template_sha_or_none(tokenizer),
    )
    metadata.regenerated = regenerate.metadata() if regenerate is not None else None
    metadata.self_prompted = self_prompter.metadata() if self_prompter is not None else None
    metadata.mix = mix_statistics(rows)
    _write(output, rows=rows, token_freq=token_freq, metadata=metadata)
    report = PrepareReport(
        output=output,
        rows_written=len(rows),
        rows_skipped=metadata.rows_skipped,
        total_tokens=metadata.total_tokens,
        supervised_tokens=metadata.supervised_tokens,
        sources=list(reports.values()),
        metadata=metadata,
    )
    logger.info("%s", report.summary())
    return report


def _self_written(reports: dict[str, SourceReport], self_prompter: SelfPrompter | None) -> list[Record]:
    """The conversations of `--data self`, written by the verifier now (none without that source)."""
    report = reports.get(SELF_DATA)
    if report is None:
        return []
    if self_prompter is None:
        raise DataError("--data self needs a verifier to write with: none was given to prepare_data")
    written: list[Record] = list(self_prompter.conversations())
    report.rows_read = len(written)
    if not written:
        raise DataError(f"--data self wrote no usable conversation: {self_prompter.summary()}")
    return written


def _read_sources(reports: dict[str, SourceReport]) -> list[Record]:
    """Parse every source; rows that fail to parse are skipped now, before any tokenization."""
    records: list[Record] = []
    for spec, report in reports.items():
        if spec == SELF_DATA:
            continue
        before = len(records)
        for item in read_source(spec):
            report.rows_read += 1
            if isinstance(item, RowError):
                report.skip(item)
            else:
                records.append(item)
        if len(records) == before:
            raise DataError(_no_usable_rows_message(report))
    return records


def _select_rows(
    records: list[Record],
    *,
    tokenize: Tokenize,
    config: PrepareDataConfig,
    reports: dict[str, SourceReport],
    regenerate_round: int | None = None,
) -> tuple[list[TokenizedRow], list[Record]]:
    """Tokenize records in (shuffled) order until `max_samples` rows are kept.

    When regenerating, records go in rounds of `regenerate_round`, shrunk to the rows still
    needed, so `max_samples` never pays for unused generation.

    Returns the kept rows and the records not used (tokenized past the quota, or never tried).
    """
    limit = config.max_samples if config.max_samples is not None else len(records)
    step = CHUNK * config.num_proc
    kept: list[TokenizedRow] = []
    done = 0
    while done < len(records) and len(kept) < limit:
        size = min(regenerate_round, limit - len(kept)) if regenerate_round else step
        batch = records[done : done + size]
        for offset, result in enumerate(tokenize(batch)):
            if len(kept) >= limit:
                done += offset  # the rest of this batch counts as untried
                break
            row = _accept(result, report=reports[result.source], config=config)
            if row is not None:
                kept.append(row)
                reports[row.source].rows_written += 1
                reports[row.source].rows_truncated += len(row.input_ids) < len(result.input_ids)
        else:
            done += len(batch)
    untried = records[done:]
    for record in untried:
        reports[record.source].rows_unused += 1
    return kept, untried


def _accept(
    result: TokenizedRow | RowError, *, report: SourceReport, config: PrepareDataConfig
) -> TokenizedRow | None:
    """Truncate a tokenized row and keep it if it has enough supervised tokens; else record why not."""
    if isinstance(result, RowError):
        report.skip(result)
        return None
    row = truncate(result, seq_length=config.seq_length)
    supervised = sum(row.loss_mask)
    if supervised < config.min_supervised_tokens:
        report.skip(
            RowError(
                row.source,
                row.line,
                f"{supervised} supervised tokens after truncation to seq_length={config.seq_length} "
                f"(min_supervised_tokens={config.min_supervised_tokens})",
                "too_few_supervised",
            )
        )
        return None
    return row


def _prove_usable(
    report: SourceReport, *, untried: list[Record], tokenize: Tokenize, config: PrepareDataConfig
) -> None:
    """A source with no row written: tokenize its untried rows until one is usable, else `DataError`.

    (With a small `max_samples` a small source may legitimately get no row; a source whose every
    row is broken must still fail loudly.)
    """
    mine = [r for r in untried if r.source == report.spec]
    for start in range(0, len(mine), CHUNK):
        batch = mine[start : start + CHUNK]
        for result in tokenize(batch):
            report.rows_unused -= 1
            if _accept(result, report=report, config=config) is not None:
                report.rows_unused += 1  # usable; left out only because the quota was full
                logger.info("source %s: usable, but no row of it was needed for max_samples", report.spec)
                return
    raise DataError(_no_usable_rows_message(report))


def _no_usable_rows_message(report: SourceReport) -> str:
    if report.rows_read == 0:
        return f"data source {report.spec!r} has no usable row: it is empty"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.skipped.items()))
    examples = "\n".join(f"  {e}" for _, e in sorted(report.example_errors.items()))
    return (
        f"data source {report.spec!r} has no usable row: all {report.rows_read} rows were skipped ({kinds}); "
        f"the first of each kind:\n{examples}"
    )


def _metadata(
    config: PrepareDataConfig,
    *,
    rows: list[TokenizedRow],
    reports: list[SourceReport],
    token_freq: torch.Tensor,
    vocab_size: int,
    tokenizer_fingerprint: str,
    template_sha256: str | None,
) -> PreparedMetadata:
    skipped: Counter[str] = Counter()
    for report in reports:
        skipped.update(report.skipped)
    return PreparedMetadata(
        model=config.model,
        tokenizer_fingerprint=tokenizer_fingerprint,
        chat_template_sha256=template_sha256,
        vocab_size=vocab_size,
        seq_length=config.seq_length,
        assistant_only_loss=config.assistant_only_loss,
        min_supervised_tokens=config.min_supervised_tokens,
        max_samples=config.max_samples,
        seed=config.seed,
        rows_written=len(rows),
        rows_skipped=dict(sorted(skipped.items())),
        rows_truncated=sum(r.rows_truncated for r in reports),
        total_tokens=sum(len(r.input_ids) for r in rows),
        supervised_tokens=int(token_freq.sum()),
        sources=[r.counts() for r in reports],
        columns=list(COLUMNS),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _template_sha_or_none(tokenizer: Any) -> str | None:
    try:
        return chat_template_sha256(tokenizer)
    except DataError:
        return None


def count_supervised_tokens(rows: Iterable[TokenizedRow], *, vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size]: how often each token id is at a loss-mask position."""
    freq = torch.zeros(vocab_size, dtype=torch.int64)
    for row in rows:
        ids = torch.tensor(row.input_ids, dtype=torch.int64)
        mask = torch.tensor(row.loss_mask, dtype=torch.bool)
        freq += torch.bincount(ids[mask], minlength=vocab_size)
    return freq


def _check_output(output: Path) -> None:
    """Refuse to write over anything but an earlier prepare-data output."""
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / METADATA_FILE).exists():
        raise DataError(
            f"--output {output} is a non-empty folder that is not a prepare-data output; "
            "choose a new or empty folder (nothing was overwritten)"
        )


def _write(
    output: Path, *, rows: list[TokenizedRow], token_freq: torch.Tensor, metadata: PreparedMetadata
) -> None:
    """Write into a sibling temp folder, then swap it in, so a crash never leaves half a dataset."""
    from datasets import Dataset, Features, List, Value

    features = Features(
        {"input_ids": List(Value("int32")), "loss_mask": List(Value("int8")), "source": Value("string")}
    )
    dataset = Dataset.from_dict(
        {
            "input_ids": [r.input_ids for r in rows],
            "loss_mask": [r.loss_mask for r in rows],
            "source": [r.source for r in rows],
        },
        features=features,
    )
    replacing = output.exists()
    with atomic_folder(output) as tmp:
        dataset.save_to_disk(str(tmp))
        torch.save(token_freq, tmp / TOKEN_FREQ_FILE)
        # Metadata last: its presence marks a complete folder.
        write_metadata(tmp, metadata)
    if replacing:
        logger.info("replaced the earlier prepare-data output in %s", output)


# ---------------------------------------------------------------------------------------------
# Reading it back
# ---------------------------------------------------------------------------------------------


def load_prepared(path: str | Path) -> tuple[Any, PreparedMetadata]:
    """Open a prepare-data folder: `(datasets.Dataset, its metadata)`. Raises `DataError` otherwise."""
    from datasets import Dataset, load_from_disk

    folder = Path(path)
    metadata = read_metadata(folder)
    if not (folder / TOKEN_FREQ_FILE).is_file():
        raise DataError(f"{folder} has no {TOKEN_FREQ_FILE}; re-run `dflash prepare-data --output {folder}`")
    try:
        dataset = load_from_disk(str(folder))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise DataError(
            f"{folder}: the dataset files cannot be read ({exc}); re-run `dflash prepare-data`"
        ) from exc
    if not isinstance(dataset, Dataset):
        raise DataError(f"{folder} holds a DatasetDict, not the single dataset prepare-data writes")
    missing = [c for c in COLUMNS[:2] if c not in dataset.column_names]
    if missing:
        raise DataError(f"{folder}: dataset lacks column(s) {missing}")
    if len(dataset) != metadata.rows_written:
        raise DataError(
            f"{folder}: {len(dataset)} rows on disk but {METADATA_FILE} says {metadata.rows_written}; "
            "the folder was modified after prepare-data wrote it"
        )
    return dataset, metadata


def load_token_freq(path: str | Path) -> torch.Tensor:
    """`token_freq.pt` of a prepare-data folder: int64 [vocab_size] counts of supervised tokens."""
    file = Path(path) / TOKEN_FREQ_FILE
    if not file.is_file():
        raise DataError(f"{Path(path)} has no {TOKEN_FREQ_FILE}; re-run `dflash prepare-data`")
    freq = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(freq, torch.Tensor) or freq.dim() != 1 or freq.dtype != torch.int64:
        raise DataError(f"{file} must hold a 1-D int64 tensor")
    return freq
