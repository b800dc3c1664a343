"""The job store: compare-and-set moves. Its schema's migrations: test_migrations.py."""

from __future__ import annotations

from services.control_plane.schemas import MetricRowIn
from services.control_plane.states import JobState
from services.control_plane.store import JobStore


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
