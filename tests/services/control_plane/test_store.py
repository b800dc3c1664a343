"""The job store: migrations at start, the live tables agree with them, compare-and-set moves."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import MetaData, create_engine, insert, inspect

from services.control_plane import migrations
from services.control_plane.migrations import LATEST_VERSION, SchemaTooNew
from services.control_plane.schemas import MetricRowIn
from services.control_plane.states import JobState
from services.control_plane.store import JobStore, metadata
from tests.services.control_plane.harness import ROOT


def test_a_fresh_database_is_migrated_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(url)
    assert store.schema_version == LATEST_VERSION
    store.close()
    again = JobStore(url)  # a restart: nothing to do
    with again.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT version FROM schema_migrations").scalars().all()
    assert rows == [m.version for m in migrations.MIGRATIONS]
    again.close()


def test_the_store_tables_match_what_the_migrations_create(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    migrations.migrate(engine)
    inspector = inspect(engine)
    dialect = engine.dialect
    for table in metadata.sorted_tables:
        migrated = {
            c["name"]: (c["type"].compile(dialect), c["nullable"]) for c in inspector.get_columns(table.name)
        }
        live = {c.name: (c.type.compile(dialect), c.nullable) for c in table.columns}
        assert migrated == live, table.name


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    db = tmp_path / "jobs.db"
    engine = create_engine(f"sqlite:///{db}")
    migrations.migrate(engine)
    table = migrations._version_table(MetaData())
    with engine.begin() as conn:
        conn.execute(insert(table).values(version=LATEST_VERSION + 1, description="future", applied_at=0.0))
    with pytest.raises(SchemaTooNew, match=f"schema version {LATEST_VERSION + 1}"):
        JobStore(f"sqlite:///{db}")
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
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "upgrade dflash" in result.stdout


def test_transitions_are_compare_and_set(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.insert_job(job_id="a", name=None, config={"save_path": "/x"}, gpus_requested=0, executor="local")
    claimed = store.transition("a", expect=[JobState.QUEUED], to=JobState.STARTING, gpus=[3])
    assert claimed is not None and claimed.state == JobState.STARTING and claimed.gpus == [3]
    # A second claimer (or a cancel that read the old state) loses, and nothing changes.
    assert store.transition("a", expect=[JobState.QUEUED], to=JobState.CANCELLED) is None
    assert store.get_job("a").state == JobState.STARTING
    assert store.assigned_gpus() == {3}
    store.add_metric_rows("a", attempt=1, rows=[MetricRowIn(step=1, time=0.0, metrics={"x": 1.0})])
    assert not store.delete_job("a", expect=[JobState.QUEUED])  # refused: nothing is deleted
    assert store.get_job("a") is not None and store.metric_row_count("a") == 1
    assert store.delete_job("a", expect=[JobState.STARTING])
    assert store.get_job("a") is None and store.metric_row_count("a") == 0
    assert store.transition("missing", expect=list(JobState), step=1) is None
    store.close()
