"""The jobs routes over real HTTP: submit, list, get, cancel, resume, delete, and what they refuse.

The control plane here starts nothing (max_concurrent_jobs=0), so jobs stay where the test puts
them; the states only a live trainer reaches are covered in test_end_to_end.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.services.control_plane.harness import ControlPlaneServer


def body(server: ControlPlaneServer, **fields) -> dict:
    """A minimal valid job: a data folder under the data root."""
    return {"data_path": "prepared", **fields}


def test_submit_fills_defaults_resolves_paths_and_queues(server):
    response = server.client.post("/v1/jobs", json=body(server, name="first", epochs=2))
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    settings = server.settings
    assert job["state"] == "queued" and job["name"] == "first" and job["attempt"] == 1
    assert job["config"]["data_path"] == str(Path(settings.data_root).resolve() / "prepared")
    # No save_path given: <checkpoint-root>/<job id>.
    assert job["config"]["save_path"] == str(Path(settings.checkpoint_root).resolve() / job["id"])
    assert job["config"]["epochs"] == 2 and job["config"]["block_size"] == 8  # TrainConfig's default
    assert job["gpus_requested"] == 0 and job["gpus"] == [] and job["pid"] is None
    assert server.job(job["id"]) == job


def test_list_is_newest_first_filters_by_state_and_pages(server):
    ids = [server.submit(body(server, save_path=f"run-{i}"))["id"] for i in range(5)]
    server.client.post(f"/v1/jobs/{ids[1]}/cancel").raise_for_status()
    listed = server.client.get("/v1/jobs").json()
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["count"] == 5
    assert listed["next_cursor"] is None

    queued = server.client.get("/v1/jobs", params={"state": "queued"}).json()
    assert [j["id"] for j in queued["data"]] == [ids[4], ids[3], ids[2], ids[0]] and queued["count"] == 4
    both = server.client.get("/v1/jobs", params={"state": ["queued", "cancelled"]}).json()
    assert both["count"] == 5

    seen, cursor = [], None
    while True:
        page = server.client.get(
            "/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    by_offset = server.client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in by_offset["data"]] == [ids[2], ids[1]]

    assert server.client.get("/v1/jobs", params={"cursor": "1", "offset": 1}).status_code == 422
    assert server.client.get("/v1/jobs", params={"cursor": "abc"}).status_code == 422
    assert server.client.get("/v1/jobs", params={"state": "paused"}).status_code == 422
    assert server.client.get("/v1/jobs", params={"limit": 0}).status_code == 422


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"bogus_flag": 1}, "bogus_flag", "Extra inputs are not permitted"),
        ({"block_size": 1}, "block_size", "greater than or equal to 2"),
        ({"loss": "mse"}, "loss", "'ce' or 'kl'"),
        ({"epochs": "many"}, "epochs", "valid integer"),
        ({"control_plane_url": "http://elsewhere"}, "control_plane_url", "set by the control plane"),
        ({"job_id": "mine"}, "job_id", "set by the control plane"),
        ({"gpus": 1}, "gpus", "this control plane has no GPUs"),
        ({"gpus": -1}, "gpus", "greater than or equal to 0"),
        ({"name": "x" * 201}, "name", "at most 200 characters"),
    ],
)
def test_invalid_jobs_are_422_naming_the_field(server, fields, field, words):
    response = server.client.post("/v1/jobs", json=body(server, **fields))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == ["body", field] and words in e["msg"] for e in errors), errors
    assert all("input" not in e for e in errors)  # the offending value is not echoed back
    assert server.client.get("/v1/jobs").json()["count"] == 0


def test_cross_field_and_missing_field_errors_name_the_flag(server):
    missing = server.client.post("/v1/jobs", json={"epochs": 1})
    assert missing.status_code == 422
    assert any(e["loc"] == ["body", "data_path"] for e in missing.json()["detail"])
    cross = server.client.post("/v1/jobs", json=body(server, sliding_window=64))
    assert cross.status_code == 422 and "--sliding-window" in cross.text
    not_json = server.client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422


def test_gpus_and_nproc_must_agree(start_server):
    server = start_server(max_concurrent_jobs=0, gpus=[0, 1])
    assert server.submit(body(server, save_path="a"))["gpus_requested"] == 1  # a GPU host: one by default
    job = server.submit(body(server, save_path="b", gpus=2))
    assert job["gpus_requested"] == 2 and job["config"]["nproc"] == 2
    assert server.submit(body(server, save_path="c", nproc=2))["gpus_requested"] == 2
    assert server.submit(body(server, save_path="d", gpus=0))["gpus_requested"] == 0
    mismatch = server.client.post("/v1/jobs", json=body(server, save_path="e", gpus=2, nproc=1))
    assert mismatch.status_code == 422 and mismatch.json()["detail"][0]["loc"] == ["body", "nproc"]
    too_many = server.client.post("/v1/jobs", json=body(server, save_path="f", gpus=3))
    assert too_many.status_code == 422 and "GPUs [0, 1]" in too_many.text


# ---------------------------------------------------------------------- paths
@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("data_path", "../elsewhere"),
        ("data_path", "prepared/../../elsewhere"),
        ("data_path", "prepared/../inside"),  # stays inside, but `..` is refused outright
        ("data_path", "{outside}"),
        ("data_path", "/etc"),
        ("save_path", "{outside}/ckpt"),
        ("save_path", "../../x"),
        ("save_path", "{data_root}/ckpt"),  # checkpoints go under the checkpoint root only
        ("hidden_states_cache", "/tmp/cache"),
        ("from_pretrained", "{outside}"),
        ("control_plane_token_file", "/etc/passwd"),
        ("data_path", "~/data"),
        ("eval_prompts", "/etc/passwd"),  # a file of prompts is data too
        ("eval_prompts", "../prompts.jsonl"),
        ("eval_prompts", "{outside}/prompts.jsonl"),
        ("verifier_name_or_path", "{outside}"),  # a local verifier folder is read by the trainer
        ("verifier_name_or_path", "/etc/model.gguf"),
        ("verifier_name_or_path", "../models/verifier"),
        ("verifier_name_or_path", "~/models/verifier"),
    ],
)
def test_paths_outside_the_roots_are_422_naming_the_field(server, outside, field, value):
    value = value.format(outside=outside, data_root=server.settings.data_root)
    fields = {"data_path": "prepared", field: value}
    response = server.client.post("/v1/jobs", json=fields)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field] and field in error["msg"]
    assert server.client.get("/v1/jobs").json()["count"] == 0


def test_symlinks_escaping_a_root_are_refused(server, outside):
    data_root = Path(server.settings.data_root)
    os.symlink(outside, data_root / "escape")
    response = server.client.post("/v1/jobs", json={"data_path": "escape/prepared"})
    assert response.status_code == 422 and "through a symlink" in response.text
    (data_root / "real").mkdir()
    os.symlink(data_root / "real", data_root / "alias")  # a link that stays inside is fine
    job = server.submit({"data_path": "alias"})
    assert job["config"]["data_path"] == str((data_root / "real").resolve())


def test_paths_inside_the_roots_are_accepted_absolute_or_relative(server):
    data_root = Path(server.settings.data_root).resolve()
    checkpoints = Path(server.settings.checkpoint_root).resolve()
    job = server.submit(
        {
            "data_path": str(data_root / "prepared"),
            "save_path": "runs/a",
            "hidden_states_cache": "cache",
            "from_pretrained": str(checkpoints / "older" / "checkpoint_best"),
            "control_plane_token_file": "token.txt",
        }
    )
    config = job["config"]
    assert config["save_path"] == str(checkpoints / "runs" / "a")
    assert config["hidden_states_cache"] == str(data_root / "cache")
    assert config["from_pretrained"] == str(checkpoints / "older" / "checkpoint_best")
    assert config["control_plane_token_file"] == str(data_root / "token.txt")


def test_a_local_verifier_is_confined_and_hub_ids_are_not_paths(start_server, outside):
    server = start_server(max_concurrent_jobs=0, model_roots=[str(outside)])
    data_root = Path(server.settings.data_root).resolve()
    in_model_root = server.submit({"data_path": "prepared", "verifier_name_or_path": str(outside / "qwen")})
    assert in_model_root["config"]["verifier_name_or_path"] == str(outside.resolve() / "qwen")
    relative = server.submit({"data_path": "prepared", "verifier_name_or_path": "./models/smol.gguf"})
    assert relative["config"]["verifier_name_or_path"] == str(outside.resolve() / "models" / "smol.gguf")
    in_data = server.submit({"data_path": "prepared", "verifier_name_or_path": str(data_root / "verifier")})
    assert in_data["config"]["verifier_name_or_path"] == str(data_root / "verifier")
    for name in ("Qwen/Qwen3-8B", "embedded:smollm2-135m-instruct"):  # the hub, the embedded default
        job = server.submit({"data_path": "prepared", "verifier_name_or_path": name})
        assert job["config"]["verifier_name_or_path"] == name
    elsewhere = {"data_path": "prepared", "verifier_name_or_path": "/opt/x"}
    refused = server.client.post("/v1/jobs", json=elsewhere)
    assert refused.status_code == 422 and str(outside.resolve()) in refused.text


def test_two_live_jobs_cannot_share_a_save_path(server):
    first = server.submit(body(server, save_path="shared"))
    clash = server.client.post("/v1/jobs", json=body(server, save_path="shared"))
    assert clash.status_code == 422 and first["id"] in clash.text
    assert clash.json()["detail"][0]["loc"] == ["body", "save_path"]
    server.client.post(f"/v1/jobs/{first['id']}/cancel").raise_for_status()
    second = server.submit(body(server, save_path="shared"))  # the first one is over
    resume = server.client.post(f"/v1/jobs/{first['id']}/resume")  # now the second holds it
    assert resume.status_code == 409 and second["id"] in resume.json()["detail"]


# ---------------------------------------------------------------------- actions
def test_cancel_resume_delete_from_queued_and_cancelled(server):
    job = server.submit(body(server))
    jid = job["id"]
    for action in ("resume",):
        refused = server.client.post(f"/v1/jobs/{jid}/{action}")
        assert refused.status_code == 409
        assert refused.json() == {
            "detail": f"cannot resume job {jid}: it is queued (resume is allowed from cancelled, failed)",
            "state": "queued",
            "action": "resume",
        }
    cancelled = server.client.post(f"/v1/jobs/{jid}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["cancel_requested"]
    assert cancelled["reason"] == "cancelled before it started" and cancelled["finished_at"]
    again = server.client.post(f"/v1/jobs/{jid}/cancel")
    assert again.status_code == 409 and "it is cancelled" in again.json()["detail"]

    resumed = server.client.post(f"/v1/jobs/{jid}/resume").json()
    assert resumed["state"] == "queued" and resumed["attempt"] == 2
    assert resumed["reason"] is None and not resumed["cancel_requested"] and resumed["finished_at"] is None

    log = server.client.get(f"/v1/jobs/{jid}/logs").text
    assert "cancel requested" in log and "attempt 2 queued" in log
    assert server.client.delete(f"/v1/jobs/{jid}").status_code == 204  # queued: no process yet
    assert server.client.get(f"/v1/jobs/{jid}").status_code == 404
    assert not (server.settings.resolved_jobs_dir / jid).exists()


def test_unknown_jobs_are_404_on_every_route(server):
    missing = "20000101-000000-000000"
    for method, path in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/resume"),
        ("DELETE", ""),
        ("GET", "/metrics"),
        ("GET", "/metrics/stream"),
        ("GET", "/logs"),
        ("GET", "/checkpoints"),
        ("GET", "/checkpoints/latest/archive"),
    ]:
        response = server.client.request(method, f"/v1/jobs/{missing}{path}")
        assert response.status_code == 404, (method, path, response.text)
    posted = server.client.post(f"/v1/jobs/{missing}/metrics", json={"rows": []})
    assert posted.status_code == 404


def test_bodies_over_the_limit_are_413(start_server):
    server = start_server(max_concurrent_jobs=0, max_body_bytes=4096, max_metrics_body_bytes=1 << 20)
    big = body(server, name="x" * 100, run_name="y" * 8000)
    assert server.client.post("/v1/jobs", json=big).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"data_path": "prepared", "run_name": "'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"}'

    chunked = server.client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert server.client.get("/v1/jobs").json()["count"] == 0
    # The metrics route has its own, larger limit (the trainer sends up to 500 rows at once).
    job = server.submit(body(server))
    rows = [{"step": i, "time": 1.0, "metrics": {f"m{k}": 0.5 for k in range(20)}} for i in range(100)]
    response = server.client.post(f"/v1/jobs/{job['id']}/metrics", json={"rows": rows})
    assert response.status_code == 200 and response.json() == {"accepted": 100}


def test_named_prompt_sets_stay_names_and_prompt_files_resolve_in_the_data_root(server):
    data_root = Path(server.settings.data_root).resolve()
    assert (
        server.submit({"data_path": "prepared", "eval_prompts": "chitchat"})["config"]["eval_prompts"]
        == "chitchat"
    )
    job = server.submit({"data_path": "prepared", "eval_prompts": "held_out.jsonl", "save_path": "other"})
    assert job["config"]["eval_prompts"] == str(data_root / "held_out.jsonl")


def test_save_paths_may_not_nest_in_each_other_nor_be_the_root(server):
    server.submit({"data_path": "prepared", "save_path": "runs/a"})
    for save_path, holder in (("runs/a/inner", True), ("runs", True), ("runs/b", False), (".", False)):
        response = server.client.post("/v1/jobs", json={"data_path": "prepared", "save_path": save_path})
        if save_path == ".":
            assert response.status_code == 422 and "checkpoint root itself" in response.text
        elif holder:
            assert response.status_code == 422 and "in use by job" in response.text, save_path
        else:
            assert response.status_code == 201, response.text


def test_cpu_jobs_ask_for_a_bounded_number_of_processes(server):
    response = server.client.post("/v1/jobs", json={"data_path": "prepared", "gpus": 0, "nproc": 5000})
    assert response.status_code == 422 and "at most 16 processes without GPUs" in response.text
