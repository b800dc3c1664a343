"""The job store's schema, as numbered migrations applied in order at start.

Each migration is frozen once released: it builds its own tables on its own MetaData (never the
live one in store.py), so replaying it on an empty database always gives the same schema. A
change to the schema is a new migration appended to MIGRATIONS. `schema_migrations` records what
ran; a database written by a newer release (a version we do not know) is refused, not guessed at.

Plain SQLAlchemy Core DDL, so the same migrations run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

logger = logging.getLogger(__name__)

VERSION_TABLE = "schema_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    upgrade: Callable[[Connection], None]


def _version_table(metadata: MetaData) -> Table:
    return Table(
        VERSION_TABLE,
        metadata,
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("description", String(200), nullable=False),
        Column("applied_at", Float, nullable=False),
    )


def _v1_jobs_and_metrics(conn: Connection) -> None:
    metadata = MetaData()
    Table(
        "jobs",
        metadata,
        # seq orders jobs (newest first) and is the pagination cursor; id is the public name.
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(64), nullable=False, unique=True),
        Column("name", String(200)),
        Column("state", String(16), nullable=False, index=True),
        Column("reason", Text),
        Column("config", Text, nullable=False),  # TrainConfig JSON, paths resolved
        Column("gpus_requested", Integer, nullable=False),
        Column("gpus", Text, nullable=False),  # JSON list of assigned GPU indices
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
    )
    rows = Table(
        "metric_rows",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("step", Integer, nullable=False),
        Column("time", Float, nullable=False),
        Column("metrics", Text, nullable=False),  # JSON object name -> float | null
    )
    Index("ix_metric_rows_job_step", rows.c.job_id, rows.c.step)
    metadata.create_all(conn)


def _v2_agents(conn: Connection) -> None:
    metadata = MetaData()
    Table(
        "agents",
        metadata,
        # id is derived from the agent's name: an agent that restarts keeps its identity (and
        # re-adopts the trainers it left running).
        Column("id", String(64), primary_key=True, autoincrement=False),
        Column("name", String(200), nullable=False),
        Column("host", String(200), nullable=False),
        Column("gpus", Text, nullable=False),  # JSON list of the agent's GPU indices
        Column("max_jobs", Integer, nullable=False),
        Column("state", String(16), nullable=False),  # live | lost | gone
        Column("registered_at", Float, nullable=False),
        Column("last_seen_at", Float, nullable=False),
    )
    metadata.create_all(conn)
    # Which agent runs a job (null for the local executor). Plain DDL: SQLite and PostgreSQL
    # both add a nullable column in place.
    conn.execute(text("ALTER TABLE jobs ADD COLUMN agent_id VARCHAR(64)"))


def _v3_metric_rows_by_job_and_id(conn: Connection) -> None:
    # A job's rows in arrival (id) order straight from the index: with only (job_id, step), every
    # history read and every poll `after_id` sorted the job's rows first.
    conn.execute(text("CREATE INDEX ix_metric_rows_job_id ON metric_rows (job_id, id)"))


MIGRATIONS: list[Migration] = [
    Migration(1, "jobs and metric rows", _v1_jobs_and_metrics),
    Migration(2, "trainer agents; jobs.agent_id", _v2_agents),
    Migration(3, "index metric_rows (job_id, id)", _v3_metric_rows_by_job_and_id),
]
LATEST_VERSION = MIGRATIONS[-1].version


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this one."""


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table(VERSION_TABLE):
        return 0
    table = _version_table(MetaData())
    versions = conn.execute(select(table.c.version)).scalars().all()
    return max(versions, default=0)


def migrate(engine: Engine) -> int:
    """Bring the database to LATEST_VERSION; returns the version it is at. Idempotent."""
    with engine.begin() as conn:
        metadata = MetaData()
        version_table = _version_table(metadata)
        metadata.create_all(conn)
        version = current_version(conn)
    if version > LATEST_VERSION:
        raise SchemaTooNew(
            f"the job store {engine.url.render_as_string(hide_password=True)} is at schema version "
            f"{version}, newer than this control plane knows ({LATEST_VERSION}): upgrade dflash"
        )
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        # One transaction per migration: a failure leaves the database at the previous version.
        with engine.begin() as conn:
            migration.upgrade(conn)
            conn.execute(
                version_table.insert().values(
                    version=migration.version, description=migration.description, applied_at=time.time()
                )
            )
        logger.info("job store migrated to schema version %d (%s)", migration.version, migration.description)
        version = migration.version
    return version
