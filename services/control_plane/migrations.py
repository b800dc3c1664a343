"""Brings the job store's schema up to date at start: the Alembic revisions in alembic/versions/.

The revisions ship inside the package (found beside this file, so an installed wheel and any
working directory work alike) and are applied in code: no alembic.ini. Revision ids are the schema
version numbers, zero-padded ("0003" is version 3, what /healthz reports). A database at a
revision this release does not know was written by a newer one and is refused, not guessed at.

Before Alembic the schema was kept by hand-written migrations in a `schema_migrations` table. Such
a database is stamped with the revision its version equals and upgraded from there. That table is
kept, holding one more row, LEGACY_REFUSAL: every release from before Alembic reads it as a
version newer than it knows and refuses the database, where it would otherwise replay its
migrations over ours.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Float, Integer, MetaData, String, Table, func, inspect, select
from sqlalchemy.engine import Connection

logger = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).with_name("alembic")
LEGACY_TABLE = "schema_migrations"
# Above any version a hand-written migration ever had (the last was 3).
LEGACY_REFUSAL = 1_000_000


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this one."""


def _legacy_table() -> Table:
    # The hand-written migrations' version table, as they created it.
    return Table(
        LEGACY_TABLE,
        MetaData(),
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("description", String(200), nullable=False),
        Column("applied_at", Float, nullable=False),
    )


def alembic_config(conn: Connection) -> Config:
    """An Alembic Config for the revisions shipped here, running on `conn` (alembic/env.py)."""
    config = Config()
    # The value goes through ConfigParser interpolation: a `%` in the path must be doubled.
    config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    config.attributes["connection"] = conn
    return config


def head_version() -> int:
    """The schema version this release builds."""
    return int(ScriptDirectory(str(SCRIPT_LOCATION)).get_current_head())


def _too_new(engine: Engine, found: str) -> SchemaTooNew:
    return SchemaTooNew(
        f"the job store {engine.url.render_as_string(hide_password=True)} is at schema version {found}, "
        f"newer than this control plane knows ({head_version()}): upgrade dflash"
    )


def _adopt_legacy(conn: Connection, config: Config, engine: Engine) -> None:
    """Stamp a database the hand-written migrations built with the revision its version equals."""
    if not inspect(conn).has_table(LEGACY_TABLE):
        return
    version = conn.execute(select(func.max(_legacy_table().c.version))).scalar()
    if version is None:
        return  # the table, but no migration ever finished: the revisions build everything
    if version > head_version():
        raise _too_new(engine, str(version))
    command.stamp(config, f"{version:04d}")
    logger.info("job store at hand-written schema version %d: now tracked by Alembic", version)


def _refuse_older_releases(conn: Connection) -> None:
    table = _legacy_table()
    table.create(conn, checkfirst=True)
    if conn.execute(select(table.c.version).where(table.c.version == LEGACY_REFUSAL)).first() is None:
        conn.execute(
            table.insert().values(
                version=LEGACY_REFUSAL, description="now kept by Alembic", applied_at=time.time()
            )
        )


def migrate(engine: Engine) -> int:
    """Bring the database to the newest revision; returns its schema version. Idempotent."""
    # One transaction for the whole upgrade: a failure leaves the database as it was (where the
    # database rolls DDL back: PostgreSQL does).
    with engine.begin() as conn:
        config = alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        if current is None:
            _adopt_legacy(conn, config, engine)
        elif current not in {s.revision for s in ScriptDirectory.from_config(config).walk_revisions()}:
            raise _too_new(engine, current)
        command.upgrade(config, "head")
        _refuse_older_releases(conn)
    return head_version()
