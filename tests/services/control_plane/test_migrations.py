"""The job store's Alembic revisions: a fresh database, one from the hand-written migrations before
them, one from a newer release; and the live tables in store.py agree with what they build."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text

from services.control_plane.migrations import (
    LEGACY_REFUSAL,
    LEGACY_TABLE,
    SchemaTooNew,
    head_version,
    migrate,
)
from services.control_plane.store import JobStore, metadata

FIXTURES = Path(__file__).parents[2] / "fixtures" / "control_plane"
# The last version the hand-written migrations reached: every release from before Alembic
# refuses a database whose schema_migrations holds a higher one.
LAST_HAND_WRITTEN = 3


def _diffs(engine: Engine) -> list:
    def ours(name: str | None, type_: str, _parent: object) -> bool:
        return not (type_ == "table" and name == LEGACY_TABLE)

    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"include_name": ours}), metadata)


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _legacy_versions(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT version FROM {LEGACY_TABLE} ORDER BY version")).scalars().all()


def _from_dump(tmp_path: Path, then: str) -> str:
    # A SQLite database exactly as the last release with the hand-written migrations left it.
    db = tmp_path / "jobs.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((FIXTURES / "schema_v3.sql").read_text() + then)
    conn.close()
    return f"sqlite:///{db}"


def _urls() -> list[str]:
    # PostgreSQL too where one is given (never in CI): DFLASH_TEST_POSTGRES_URL, an empty database.
    postgres = os.environ.get("DFLASH_TEST_POSTGRES_URL")
    return ["sqlite", postgres] if postgres else ["sqlite"]


@pytest.mark.parametrize("url", _urls())
def test_the_revisions_build_exactly_the_live_tables(tmp_path, url):
    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}" if url == "sqlite" else url)
    try:
        assert migrate(engine) == head_version() == int(_revision(engine))
        assert _diffs(engine) == []
        assert migrate(engine) == head_version()  # a restart: nothing to do
        assert _legacy_versions(engine) == [LEGACY_REFUSAL]
    finally:
        if url != "sqlite":
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE metric_rows, agents, jobs, alembic_version, schema_migrations"))
        engine.dispose()


# Version 3 only added an index: without it, the database is one a version-2 release left.
AT_VERSION_2 = "DROP INDEX ix_metric_rows_job_id; DELETE FROM schema_migrations WHERE version = 3;"


@pytest.mark.parametrize("then", ["", AT_VERSION_2], ids=["at-version-3", "at-version-2"])
def test_a_database_of_the_hand_written_migrations_is_taken_over(tmp_path, then):
    url = _from_dump(tmp_path, then)
    store = JobStore(url)
    assert store.schema_version == head_version()
    assert store.get_job("j1").name == "before-alembic"  # its rows are still there
    assert _diffs(store.engine) == []
    # Their table stays, with one more row that every release from before Alembic refuses.
    versions = _legacy_versions(store.engine)
    assert versions[-1] == LEGACY_REFUSAL > LAST_HAND_WRITTEN
    store.close()
    JobStore(url).close()  # and the next start finds nothing to do


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    db = tmp_path / "jobs.db"
    engine = create_engine(f"sqlite:///{db}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(SchemaTooNew, match="schema version 0099"):
        JobStore(f"sqlite:///{db}")
    # From another working directory: the revisions are found beside the package, not in ./
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "control-plane",
            "--db",
            str(db),
            "--data-root",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "upgrade dflash" in result.stdout, result.stdout + result.stderr
