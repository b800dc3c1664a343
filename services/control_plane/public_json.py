"""The read routes' answers (a page of jobs, one job, a metric history) written straight from stored rows.

Each answer is the JSON JobPublic, JobsPublic or MetricsPublic would give, key for key
(tests/services/control_plane/test_public_json.py), without a pydantic model per job or row.
A stored config is validated as a TrainConfig once per distinct stored text (newer fields show
their defaults); a metric row's JSON is passed through only when the database vouches it is strict
JSON. An unreadable row raises StoredRowInvalid: an HTTP 500 naming the job and the problem.
Short SQLite reads are answered on the event loop, longer ones and other databases in the
threadpool (`answer`, `answer_rows`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar

from fastapi import HTTPException
from fastapi.responses import Response
from sqlalchemy.engine import Row
from starlette.concurrency import run_in_threadpool

from dflash_core.config import TrainConfig
from services.control_plane.schemas import JobPublic, JobRecord
from services.control_plane.store import JOB_COLUMNS, JobStore, StoredMetricRow, job_record

logger = logging.getLogger(__name__)
R = TypeVar("R")

# Distinct stored configs, and stored job rows, whose JSON is kept (~4 KiB each with the key, so
# ~8 MiB at most together): every job a dashboard pages through. A dropped one is written again.
CACHE_SIZE = 1024

# Rows an answer may hold and still be written on the event loop (~5 us each: ~10 ms at most). A
# SQLite read never waits for the writer (WAL), so a short one costs less here than a hop to a
# worker thread, where with 16 clients the threads' fight for the GIL doubled CPU per request and p99.
INLINE_ROWS = 2000

# JobPublic's fields on either side of `config`, so the answer keeps the model's key order.
_FIELDS = list(JobPublic.model_fields)
_BEFORE_CONFIG = _FIELDS[: _FIELDS.index("config")]
_AFTER_CONFIG = _FIELDS[_FIELDS.index("config") + 1 :]


class StoredRowInvalid(HTTPException):
    """A stored job or metric row this release cannot read: HTTP 500 saying which and why, logged."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=500, detail=detail)
        logger.error("%s", detail)


async def answer(store: JobStore, body: Callable[[], str]) -> Response:
    """`body()`, a store read of at most INLINE_ROWS rows and its JSON, as the response."""
    return _json(body() if store.is_sqlite else await run_in_threadpool(body))


async def answer_rows(
    store: JobStore, *, read: Callable[[int], list[R]], write: Callable[[list[R]], str], limit: int
) -> Response:
    """`write(read(limit))` as the response, for a read of up to `limit` rows (a metric history):
    on the event loop while it finds at most INLINE_ROWS, else again in the threadpool."""
    if store.is_sqlite:
        rows = read(min(limit, INLINE_ROWS + 1))
        if len(rows) <= INLINE_ROWS:
            return _json(write(rows))
    return _json(await run_in_threadpool(lambda: write(read(limit))))


def _json(body: str) -> Response:
    return Response(content=body, media_type="application/json")


# ---------------------------------------------------------------------------------------- jobs
def job_json(job: JobRecord) -> str:
    """One job, as JobPublic."""
    fields = JobPublic.fields_of(job)
    parts = [
        _dumps({name: fields[name] for name in _BEFORE_CONFIG})[1:-1],
        f'"config":{_config_json(job)}',
        _dumps({name: fields[name] for name in _AFTER_CONFIG})[1:-1],
    ]
    return "{" + ",".join(part for part in parts if part) + "}"


def jobs_page_json(rows: Sequence[Row[Any]], *, count: int, next_cursor: str | None) -> str:
    """A page of stored job rows (JobStore.list_jobs), as JobsPublic."""
    data = ",".join(_stored_job_json(tuple(row)) for row in rows)
    return f'{{"data":[{data}],"count":{count},"next_cursor":{_dumps(next_cursor)}}}'


@lru_cache(maxsize=CACHE_SIZE)
def _stored_job_json(row: tuple[Any, ...]) -> str:
    return job_json(job_record(dict(zip(JOB_COLUMNS, row, strict=True))))


def _config_json(job: JobRecord) -> str:
    try:
        return _validated_config(job.config_json)
    except ValueError as exc:  # json.JSONDecodeError and pydantic's ValidationError alike
        raise StoredRowInvalid(
            f"job {job.id}: its stored config is not a TrainConfig this release can read: {_summary(exc)}"
        ) from None


@lru_cache(maxsize=CACHE_SIZE)
def _validated_config(stored: str) -> str:
    # The same validation as JobRecord.train_config(), and the serialisation FastAPI gives JobPublic.
    return TrainConfig.model_validate(json.loads(stored)).model_dump_json(by_alias=True)


def _summary(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a ValidationError: its first problem, and how many there are
        problems = errors()
        first = problems[0]
        where = ".".join(map(str, first["loc"])) or "config"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{where}: {first['msg']}{more}"
    return str(exc)


# ---------------------------------------------------------------------------------------- metric rows
def metric_row_json(job_id: str, row: StoredMetricRow) -> str:
    """One metric row, as MetricRowPublic."""
    time = repr(row.time) if math.isfinite(row.time) else "null"
    return (
        f'{{"id":{row.id},"attempt":{row.attempt},"step":{row.step},"time":{time},'
        f'"metrics":{_metrics_json(job_id, row)}}}'
    )


def metrics_page_json(job_id: str, rows: list[StoredMetricRow]) -> str:
    """A job's metric rows, as MetricsPublic."""
    data = ",".join(metric_row_json(job_id, row) for row in rows)
    return f'{{"job_id":{_dumps(job_id)},"data":[{data}],"count":{len(rows)}}}'


def _metrics_json(job_id: str, row: StoredMetricRow) -> str:
    if row.verbatim:
        return row.metrics
    try:
        metrics = json.loads(row.metrics)  # accepts the NaN and Infinity older releases wrote
        if not isinstance(metrics, dict) or not all(_is_number(v) for v in metrics.values()):
            raise ValueError("not an object of numbers and nulls")
    except ValueError as exc:
        raise StoredRowInvalid(
            f"job {job_id}: its stored metric row {row.id} is not an object of numbers: {exc}"
        ) from None
    return _dumps(metrics)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


# ---------------------------------------------------------------------------------------- JSON
def _dumps(value: Any) -> str:
    """Compact JSON with pydantic's conventions: NaN and +-Inf as null, datetimes as ISO 8601."""
    try:
        return _ENCODER.encode(value)
    except ValueError:  # a non-finite float somewhere
        return _ENCODER.encode(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _datetime_text(value: Any) -> str:
    if isinstance(value, datetime):
        # pydantic writes UTC as `Z`; isoformat() as `+00:00` (the same instant).
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# One encoder for every answer: json.dumps with any option builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_datetime_text)
