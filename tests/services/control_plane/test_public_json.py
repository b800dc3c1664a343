"""The read routes' JSON, written straight from stored rows, is what the pydantic models give.

JobPublic, JobsPublic and MetricsPublic stay the routes' response models (and OpenAPI schemas);
public_json.py writes the same answers without building them. Each test compares against the
models built the way the routes built them before, and unreadable stored rows must be a 500 that
says which row and why.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from dflash_core.config import TrainConfig
from services.control_plane import public_json
from services.control_plane.public_json import StoredRowInvalid
from services.control_plane.schemas import JobPublic, JobsPublic, MetricRowIn, MetricRowPublic, MetricsPublic
from services.control_plane.states import JobState
from services.control_plane.store import JobStore, StoredMetricRow, job_record

T0 = 1767225600.123456  # with microseconds: the answers' datetimes keep them


def model_json(model: JobPublic | JobsPublic | MetricsPublic) -> object:
    """What FastAPI answered for the model (its JSON, by alias), parsed."""
    return json.loads(model.model_dump_json(by_alias=True))


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.close()


def add_job(store: JobStore, job_id: str, *, root: Path, name: str | None = None, **config: object) -> None:
    fields = TrainConfig(data_path=root / "data", save_path=root / job_id, **config)
    store.insert_job(
        job_id=job_id, name=name, config=fields.model_dump(mode="json"), gpus_requested=0, executor="local"
    )


def varied_jobs(store: JobStore, tmp_path: Path) -> None:
    """Jobs covering each field's shapes: nulls, text to escape, GPUs, timestamps, a non-finite float."""
    add_job(store, "queued", root=tmp_path)
    add_job(
        store,
        "running",
        root=tmp_path,
        block_size=16,
        target_layer_ids=[1, 3],
        hidden_states_endpoint=["h:1"],
    )
    store.transition("running", expect=[JobState.QUEUED], to=JobState.STARTING, gpus=[0, 2], started_at=T0)
    store.transition(
        "running",
        expect=[JobState.STARTING],
        to=JobState.RUNNING,
        pid=4242,
        step=7,
        total_steps=90,
        epoch=0.25,
    )
    add_job(store, "failed", root=tmp_path, name='sweep "b" ✓')
    store.transition(
        "failed",
        expect=[JobState.QUEUED],
        to=JobState.FAILED,
        reason='trainer exited with status 1:\n"quoted" \\ back\tslash, naïve ✓',
        exit_code=1,
        cancel_requested_at=T0 + 1,
        finished_at=T0 + 2.5,
        epoch=float("inf"),  # stored by no one today; the API has always answered null for it
    )


def test_job_answers_are_what_jobpublic_gives(store, tmp_path):
    varied_jobs(store, tmp_path)
    rows, count = store.list_jobs(limit=10)
    records = [job_record(row._mapping) for row in rows]
    for record in records:
        answer = json.loads(public_json.job_json(record))
        assert answer == model_json(JobPublic.of(record))
        assert list(answer) == list(JobPublic.model_fields)  # the same key order too
    page = json.loads(public_json.jobs_page_json(rows, count=count, next_cursor="12"))
    expected = JobsPublic(data=[JobPublic.of(r) for r in records], count=count, next_cursor="12")
    assert page == model_json(expected)
    assert json.loads(public_json.jobs_page_json([], count=0, next_cursor=None)) == {
        "data": [],
        "count": 0,
        "next_cursor": None,
    }


def test_a_config_stored_by_an_older_release_shows_todays_defaults(store, tmp_path):
    add_job(store, "old", root=tmp_path)
    stored = json.loads(store.get_job("old").config_json)
    del stored["block_size"]  # as if the field had come in a later release
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET config = ? WHERE id = 'old'", (json.dumps(stored),))
    record = store.get_job("old")
    answer = json.loads(public_json.job_json(record))
    assert answer["config"]["block_size"] == TrainConfig.model_fields["block_size"].default
    assert answer == model_json(JobPublic.of(record))


def test_a_changed_job_is_answered_anew(store, tmp_path):
    add_job(store, "a", root=tmp_path)

    def page() -> dict:
        rows, count = store.list_jobs(limit=10)
        return json.loads(public_json.jobs_page_json(rows, count=count, next_cursor=None))

    assert page()["data"][0]["state"] == "queued"
    store.transition("a", expect=[JobState.QUEUED], to=JobState.CANCELLED, reason="by hand")
    job = page()["data"][0]
    assert (job["state"], job["reason"]) == ("cancelled", "by hand")


def test_metric_rows_are_what_metricspublic_gives(store, tmp_path):
    add_job(store, "m", root=tmp_path)
    rows = [
        MetricRowIn(step=0, time=T0, metrics={"train/loss": 2.5, "train/acc_slot_1": 1e-05}),
        MetricRowIn(step=5, time=T0 + 1, metrics={"train/loss": float("nan"), "val/loss": None}),
        MetricRowIn(step=10, time=T0 + 2, metrics={"train/grad_norm": float("inf"), "epoch": 1.0}),
    ]
    store.add_metric_rows("m", attempt=1, rows=rows)
    # A row as an older release stored it: json.dumps let NaN and Infinity through.
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO metric_rows (job_id, attempt, step, time, metrics) VALUES ('m', 2, 15, ?, ?)",
            (T0 + 3, '{"train/loss": NaN, "train/eal": -Infinity, "epoch": 2}'),
        )
    stored = store.metric_rows("m", limit=100)
    assert [row.verbatim for row in stored] == [1, 1, 1, 0]  # new rows are stored as strict JSON
    answer = json.loads(public_json.metrics_page_json("m", stored))
    # The models, fed the way the route fed them before (json.loads of each stored row).
    expected = MetricsPublic(
        job_id="m",
        data=[
            MetricRowPublic(
                id=r.id, attempt=r.attempt, step=r.step, time=r.time, metrics=json.loads(r.metrics)
            )
            for r in stored
        ],
        count=len(stored),
    )
    assert answer == model_json(expected)
    assert answer["data"][1]["metrics"]["train/loss"] is None
    assert answer["data"][3]["metrics"] == {"train/loss": None, "train/eal": None, "epoch": 2}
    tail = store.metric_rows("m", after_id=stored[1].id, limit=100)
    assert [row["step"] for row in json.loads(public_json.metrics_page_json("m", tail))["data"]] == [10, 15]


def test_a_lenient_json_valid_is_backed_by_a_search_for_nan(store, tmp_path, monkeypatch):
    """Where SQLite's json_valid() accepts NaN, rows naming NaN or Infinity are parsed, not copied."""
    add_job(store, "m", root=tmp_path)
    rows = [
        MetricRowIn(step=0, time=T0, metrics={"a": 1.0}),
        MetricRowIn(step=1, time=T0, metrics={"NaN/n": 2.0}),
    ]
    store.add_metric_rows("m", attempt=1, rows=rows)
    strict = json.loads(public_json.metrics_page_json("m", store.metric_rows("m", limit=10)))
    monkeypatch.setattr(store, "_vouch", "lenient")
    stored = store.metric_rows("m", limit=10)
    assert [row.verbatim for row in stored] == [1, 0]
    assert json.loads(public_json.metrics_page_json("m", stored)) == strict


def test_rows_the_database_cannot_vouch_for_are_parsed():
    """Another database than SQLite says nothing about a row's text (verbatim None)."""
    row = StoredMetricRow(id=1, attempt=1, step=0, time=T0, metrics='{"a": 1.5, "b": NaN}', verbatim=None)
    answer = json.loads(public_json.metric_row_json("m", row))
    assert answer["metrics"] == {"a": 1.5, "b": None} and math.isclose(answer["time"], T0)


@pytest.mark.parametrize(
    ("text", "words"),
    [("{not json", "metric row 1"), ('["a list"]', "not an object"), ('{"a": "text"}', "not an object")],
)
def test_an_unreadable_metric_row_is_named(text, words):
    row = StoredMetricRow(id=1, attempt=1, step=0, time=T0, metrics=text, verbatim=0)
    with pytest.raises(StoredRowInvalid, match=words) as raised:
        public_json.metric_row_json("job-7", row)
    assert raised.value.status_code == 500 and "job-7" in raised.value.detail


def test_unreadable_stored_rows_are_a_500_that_names_them(server):
    bad_config = server.submit({"data_path": "prepared"})["id"]
    bad_metrics = server.submit({"data_path": "prepared"})["id"]
    posted = {"rows": [{"step": 1, "time": T0, "metrics": {"train/loss": 1.0}}]}
    assert server.client.post(f"/v1/jobs/{bad_metrics}/metrics", json=posted).status_code == 200
    with sqlite3.connect(server.settings.db) as db:
        db.execute("UPDATE jobs SET config = ? WHERE id = ?", ('{"block_size": "eight"}', bad_config))
        db.execute("UPDATE metric_rows SET metrics = '{truncated' WHERE job_id = ?", (bad_metrics,))

    for path in (f"/v1/jobs/{bad_config}", "/v1/jobs"):
        response = server.client.get(path)
        assert response.status_code == 500, response.text
        detail = response.json()["detail"]
        assert bad_config in detail and "stored config" in detail
    response = server.client.get(f"/v1/jobs/{bad_metrics}/metrics")
    assert response.status_code == 500 and "stored metric row" in response.json()["detail"]
    # The other routes and jobs are untouched.
    assert server.job(bad_metrics)["state"] == "queued"
    assert server.client.get("/v1/jobs", params={"state": "cancelled"}).json()["count"] == 0


@pytest.mark.parametrize("why", ["another database", "a long answer"])
def test_reads_off_the_event_loop_answer_the_same(server, monkeypatch, why):
    jid = server.submit({"data_path": "prepared"})["id"]
    posted = {"rows": [{"step": s, "time": T0 + s, "metrics": {"train/loss": 1.0}} for s in range(3)]}
    assert server.client.post(f"/v1/jobs/{jid}/metrics", json=posted).status_code == 200

    def answers() -> tuple:
        return server.job(jid), server.client.get("/v1/jobs").json(), server.metric_rows(jid)

    on_the_loop = answers()
    if why == "another database":
        monkeypatch.setattr(server.app.state.control_plane.service.store, "is_sqlite", False)
    else:
        monkeypatch.setattr(public_json, "INLINE_ROWS", 0)
    assert answers() == on_the_loop
