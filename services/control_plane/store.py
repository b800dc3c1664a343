"""The persistent job store: every SQL statement of the control plane lives here.

SQLAlchemy Core over SQLite by default (a file; WAL so readers never wait for the writer) or any
URL (PostgreSQL for a shared deployment). The tables are created by the Alembic revisions
(`migrations.py`); the Table objects below mirror the newest schema, indexes and keys included
(a test compares them with Alembic's autogenerate: no difference).

State changes are compare-and-set: `transition()` updates a job only while it is still in one of
the expected states, so a scheduler claiming a queued job and a user cancelling it cannot both
win, with one process or several sharing the database.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    null,
    select,
    update,
)
from sqlalchemy.engine import Row, RowMapping
from sqlalchemy.sql import Select

from services.control_plane.migrations import migrate
from services.control_plane.schemas import AgentRecord, AgentState, JobRecord, MetricRowIn
from services.control_plane.states import ACTIVE_STATES, JobState

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("name", String(200)),
    Column("state", String(16), nullable=False, index=True),
    Column("reason", Text),
    Column("config", Text, nullable=False),
    Column("gpus_requested", Integer, nullable=False),
    Column("gpus", Text, nullable=False),
    Column("executor", String(32), nullable=False),
    Column("pid", Integer),
    Column("exit_code", Integer),
    Column("attempt", Integer, nullable=False),
    Column("step", Integer),
    Column("total_steps", Integer),
    Column("epoch", Float),
    Column("cancel_requested_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("agent_id", String(64)),
)

agents = Table(
    "agents",
    metadata,
    Column("id", String(64), primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("host", String(200), nullable=False),
    Column("gpus", Text, nullable=False),
    Column("max_jobs", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
)

metric_rows = Table(
    "metric_rows",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("time", Float, nullable=False),
    Column("metrics", Text, nullable=False),
    Index("ix_metric_rows_job_step", "job_id", "step"),
    Index("ix_metric_rows_job_id", "job_id", "id"),
)

# A stored job row's values in this order (what `select(jobs)` gives).
JOB_COLUMNS = tuple(jobs.columns.keys())

# Fields callers may set through transition()/update(); JSON columns are encoded here.
_JSON_FIELDS = {"config", "gpus"}
_WRITABLE = {c.name for c in jobs.columns} - {"seq", "id", "created_at"}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Threads of one process share the engine; 30 s busy timeout rides out a concurrent writer.
        # One connection per concurrent request is kept (past the default 5, each request opened a
        # fresh one, its PRAGMAs and a cold page cache: ~1 ms); beyond 16 nobody waits for one.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=16,
            max_overflow=-1,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def job_record(row: Mapping[str, Any]) -> JobRecord:
    """A stored job row (by column name) as the service sees it."""
    return JobRecord(
        id=row["id"],
        seq=row["seq"],
        name=row["name"],
        state=JobState(row["state"]),
        reason=row["reason"],
        config_json=row["config"],
        gpus_requested=row["gpus_requested"],
        gpus=json.loads(row["gpus"]),
        executor=row["executor"],
        pid=row["pid"],
        exit_code=row["exit_code"],
        attempt=row["attempt"],
        step=row["step"],
        total_steps=row["total_steps"],
        epoch=row["epoch"],
        cancel_requested_at=row["cancel_requested_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        agent_id=row["agent_id"],
    )


def _agent(row: RowMapping) -> AgentRecord:
    return AgentRecord(
        id=row["id"],
        name=row["name"],
        host=row["host"],
        gpus=json.loads(row["gpus"]),
        max_jobs=row["max_jobs"],
        state=AgentState(row["state"]),
        registered_at=row["registered_at"],
        last_seen_at=row["last_seen_at"],
    )


class StoredMetricRow(NamedTuple):
    """A metric row as stored; `metrics` is its JSON text (name -> number or null)."""

    id: int
    attempt: int
    step: int
    time: float
    metrics: str
    # 1: SQLite vouches that `metrics` is strict JSON, without the NaN and Infinity older releases
    # stored; 0: it does not; None: the database cannot say. public_json.py copies vouched-for
    # text into answers without parsing it.
    verbatim: int | None


# The read routes' statements, built once per shape: building and keying one costs more than
# running it (~60 of ~100 us for one job by id).
_JOB_BY_ID = select(jobs).where(jobs.c.id == bindparam("job_id"))


@cache
def _job_page(*, filtered: bool, before: bool) -> tuple[Select, Select]:
    """(newest-first page, count) for jobs in the `states` bound (when filtered), before `before_seq`."""
    where = [jobs.c.state.in_(bindparam("states", expanding=True))] if filtered else []
    page = select(jobs).where(*where)
    if before:
        page = page.where(jobs.c.seq < bindparam("before_seq"))
    page = page.order_by(jobs.c.seq.desc()).limit(bindparam("limit")).offset(bindparam("offset"))
    return page, select(func.count()).select_from(jobs).where(*where)


@cache
def _metric_rows_query(*, vouch: str, since: bool, after: bool) -> Select:
    """`vouch`: what this SQLite's json_valid() is, "strict" or "lenient"; "none" elsewhere."""
    c = metric_rows.c
    # json_valid is SQLite's (C, ~1 us per KiB); elsewhere the answer parses the text itself.
    verbatim = func.json_valid(c.metrics) if vouch != "none" else null()
    if vouch == "lenient":
        verbatim = verbatim & (func.instr(c.metrics, "NaN") == 0) & (func.instr(c.metrics, "Infinity") == 0)
    query = select(c.id, c.attempt, c.step, c.time, c.metrics, verbatim)
    query = query.where(c.job_id == bindparam("job_id"))
    if since:
        query = query.where(c.step >= bindparam("since_step"))
    if after:
        query = query.where(c.id > bindparam("after_id"))
    return query.order_by(c.id).limit(bindparam("limit"))


def _metrics_text(metrics: dict[str, float | None]) -> str:
    # Strict JSON: NaN and Inf are stored as null (what the API has always answered for them).
    finite = {k: (v if v is None or math.isfinite(v) else None) for k, v in metrics.items()}
    return json.dumps(finite, separators=(",", ":"), allow_nan=False)


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - _WRITABLE
    if unknown:
        raise KeyError(f"not writable job fields: {sorted(unknown)}")
    out = {k: (json.dumps(v) if k in _JSON_FIELDS else v) for k, v in values.items()}
    out = {k: (v.value if isinstance(v, JobState) else v) for k, v in out.items()}
    out["updated_at"] = time.time()
    return out


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.schema_version = migrate(self.engine)
        # A SQLite file in WAL mode: readers never wait for the writer, and a read is answered from
        # memory (public_json.answer runs the read routes on the event loop for it).
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._vouch = "none"
        if self.is_sqlite:
            # Some SQLite releases' json_valid() accepts JSON5, NaN and Infinity among it: asked once.
            with self.engine.connect() as conn:
                lenient = conn.exec_driver_sql("SELECT json_valid('[NaN]')").scalar()
            self._vouch = "lenient" if lenient else "strict"

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ jobs
    def insert_job(
        self,
        *,
        job_id: str,
        name: str | None,
        config: dict[str, Any],
        gpus_requested: int,
        executor: str,
    ) -> JobRecord:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    name=name,
                    state=JobState.QUEUED.value,
                    config=json.dumps(config, sort_keys=True),
                    gpus_requested=gpus_requested,
                    gpus="[]",
                    executor=executor,
                    attempt=1,
                    created_at=now,
                    updated_at=now,
                )
            )
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_JOB_BY_ID, {"job_id": job_id}).mappings().first()
        return job_record(row) if row is not None else None

    def list_jobs(
        self,
        *,
        states: Sequence[JobState] | None = None,
        limit: int,
        before_seq: int | None = None,
        offset: int = 0,
    ) -> tuple[Sequence[Row[Any]], int]:
        """(newest-first page of stored rows, count of all jobs matching `states`). The rows are
        raw (JOB_COLUMNS): public_json.py answers a repeated row without decoding it again."""
        page, count = _job_page(filtered=bool(states), before=before_seq is not None)
        values = {"limit": limit, "offset": offset, "before_seq": before_seq}
        values["states"] = [s.value for s in states or ()]
        with self.engine.connect() as conn:
            rows = conn.execute(page, values).all()
            total = conn.execute(count, values).scalar_one()
        return rows, int(total)

    def jobs_in(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Jobs in `states`, oldest first (the order queued jobs are started in)."""
        query = select(jobs).where(jobs.c.state.in_([s.value for s in states])).order_by(jobs.c.seq)
        with self.engine.connect() as conn:
            return [job_record(r) for r in conn.execute(query).mappings().all()]

    def transition(
        self,
        job_id: str,
        *,
        expect: Iterable[JobState],
        to: JobState | None = None,
        unsubmitted: bool = False,
        **values: Any,
    ) -> JobRecord | None:
        """Set `values` (and the state to `to`) only while the job is in one of `expect` (and,
        with `unsubmitted`, has no pid: a cluster executor stores its job id as the pid of a job
        it submitted while the job is still queued).

        Returns the updated job, or None when it was not in those states (someone else moved it
        first) or does not exist.
        """
        if to is not None:
            values["state"] = to
        where = [jobs.c.id == job_id, jobs.c.state.in_([s.value for s in expect])]
        if unsubmitted:
            where.append(jobs.c.pid.is_(None))
        query = update(jobs).where(*where).values(**_encode(values))
        with self.engine.begin() as conn:
            changed = conn.execute(query).rowcount
        return self.get_job(job_id) if changed else None

    def delete_job(self, job_id: str, *, expect: Iterable[JobState]) -> bool:
        """Delete the job and its metric rows while it is in one of `expect`, and is not a queued
        job a cluster executor has submitted (it would run with no record of it here)."""
        states = jobs.c.state.in_([s.value for s in expect])
        submitted = (jobs.c.state == JobState.QUEUED.value) & jobs.c.pid.is_not(None)
        # Rows first (the foreign key points at the job); the whole thing is undone when the job
        # has moved out of `expect` in the meantime.
        with self.engine.connect() as conn, conn.begin() as transaction:
            conn.execute(delete(metric_rows).where(metric_rows.c.job_id == job_id))
            deleted = conn.execute(
                delete(jobs).where(jobs.c.id == job_id, states, ~submitted)
            ).rowcount
            if not deleted:
                transaction.rollback()
        return bool(deleted)

    def count_by_state(self) -> dict[JobState, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): int(n) for state, n in rows})
        return counts

    def assigned_gpus(self) -> set[int]:
        """GPUs of this host held by jobs that may have a live process. Jobs run by agents hold
        GPUs of their agents' hosts (agents.py counts those), not of this one."""
        return {gpu for job in self.jobs_in(ACTIVE_STATES) if job.agent_id is None for gpu in job.gpus}

    # ------------------------------------------------------------------ agents
    def upsert_agent(
        self, *, agent_id: str, name: str, host: str, gpus: list[int], max_jobs: int
    ) -> AgentRecord:
        """Register an agent, or re-register one that restarted (same id): live, seen now."""
        now = time.time()
        values = {
            "name": name,
            "host": host,
            "gpus": json.dumps(gpus),
            "max_jobs": max_jobs,
            "state": AgentState.LIVE.value,
            "last_seen_at": now,
        }
        with self.engine.begin() as conn:
            changed = conn.execute(update(agents).where(agents.c.id == agent_id).values(**values)).rowcount
            if not changed:
                conn.execute(agents.insert().values(id=agent_id, registered_at=now, **values))
        agent = self.get_agent(agent_id)
        assert agent is not None
        return agent

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(agents).where(agents.c.id == agent_id)).mappings().first()
        return _agent(row) if row is not None else None

    def list_agents(self) -> list[AgentRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(agents).order_by(agents.c.name)).mappings().all()
        return [_agent(r) for r in rows]

    def set_agent(self, agent_id: str, *, expect: Iterable[AgentState] | None = None, **values: Any) -> bool:
        """Update an agent (state, last_seen_at) while it is in one of `expect` (any when None)."""
        values = {k: (v.value if isinstance(v, AgentState) else v) for k, v in values.items()}
        query = update(agents).where(agents.c.id == agent_id)
        if expect is not None:
            query = query.where(agents.c.state.in_([s.value for s in expect]))
        with self.engine.begin() as conn:
            return bool(conn.execute(query.values(**values)).rowcount)

    # ------------------------------------------------------------------ metric rows
    def add_metric_rows(self, job_id: str, *, attempt: int, rows: Sequence[MetricRowIn]) -> None:
        if not rows:
            return
        values = [
            {
                "job_id": job_id,
                "attempt": attempt,
                "step": row.step,
                "time": row.time,
                "metrics": _metrics_text(row.metrics),
            }
            for row in rows
        ]
        with self.engine.begin() as conn:
            conn.execute(metric_rows.insert(), values)

    def metric_rows(
        self, job_id: str, *, since_step: int | None = None, after_id: int | None = None, limit: int
    ) -> list[StoredMetricRow]:
        """Rows in arrival order: with step >= since_step and id > after_id, at most `limit`."""
        query = _metric_rows_query(
            vouch=self._vouch, since=since_step is not None, after=after_id is not None
        )
        values = {"job_id": job_id, "since_step": since_step, "after_id": after_id, "limit": limit}
        with self.engine.connect() as conn:
            return [StoredMetricRow._make(row) for row in conn.execute(query, values)]

    def metric_row_count(self, job_id: str) -> int:
        query = select(func.count()).select_from(metric_rows).where(metric_rows.c.job_id == job_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
