"""The dashboard's files over HTTP: its ES modules (each one app.js reaches through its imports,
served as JavaScript without a token) and GET /v1/meta, what they read instead of repeating it."""

from __future__ import annotations

import re

import httpx

from services.control_plane.dashboard import STATIC
from services.control_plane.schemas import JobCreate
from services.control_plane.states import ACTIVE_STATES, TERMINAL_STATES, JobState
from tests.services.control_plane.harness import TOKEN

IMPORT = re.compile(r'^import .*? from "(/dashboard/[\w.-]+\.js)";$', re.MULTILINE | re.DOTALL)


def test_every_module_is_served_as_javascript_without_the_token(start_server):
    server = start_server(token=TOKEN)
    seen: set[str] = set()
    todo = ["/dashboard/app.js"]
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            response = anonymous.get(path)
            assert response.status_code == 200, path
            # A module script with any other type is refused by the browser (strict MIME checking).
            assert response.headers["content-type"] == "text/javascript; charset=utf-8", path
            todo.extend(IMPORT.findall(response.text))
    # Every module is reached from app.js, so none is left behind when a view moves.
    assert seen == {f"/dashboard/{p.name}" for p in STATIC.glob("*.js")}


def test_meta_gives_the_states_and_an_example_the_api_accepts(start_server):
    server = start_server(token=TOKEN)
    meta = server.client.get("/v1/meta").json()
    assert meta["job_states"] == [s.value for s in JobState]
    assert set(meta["active_states"]) == {s.value for s in ACTIVE_STATES}
    assert set(meta["terminal_states"]) == {s.value for s in TERMINAL_STATES}
    # Real fields of the job spec (it refuses unknown ones), and a config it takes as it is.
    assert set(meta["not_copied"]) <= set(JobCreate.model_fields)
    JobCreate.model_validate(meta["example_config"])
    assert httpx.get(f"{server.url}/v1/meta").status_code == 401
