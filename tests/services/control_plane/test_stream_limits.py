"""Live streams (metric streams, followed logs) are capped per client address and in total: 429.

Two clients are two source addresses on loopback (127.0.0.1 and 127.0.0.2: Linux routes all of
127/8 to lo), each with its own httpx client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from tests.services.control_plane.harness import TOKEN, wait_for


@contextlib.contextmanager
def client_from(server, address: str) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(local_address=address)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, transport=transport, headers=headers, timeout=30) as client:
        yield client


def open_stream(stack: contextlib.ExitStack, client: httpx.Client, path: str) -> httpx.Response:
    """The stream's response, left open (closed with the stack) once its status is in."""
    return stack.enter_context(client.stream("GET", path))


def test_live_streams_are_capped_per_client_and_in_total(start_server):
    server = start_server(max_concurrent_jobs=0, token=TOKEN, max_streams=3, max_streams_per_client=2)
    job = server.submit({"data_path": "prepared"})["id"]  # queued: its streams stay open
    metrics, logs = f"/v1/jobs/{job}/metrics/stream", f"/v1/jobs/{job}/logs?follow=true"
    with (
        client_from(server, "127.0.0.1") as one,
        client_from(server, "127.0.0.2") as two,
        contextlib.ExitStack() as first_two,
        contextlib.ExitStack() as later,
    ):
        assert open_stream(first_two, one, metrics).status_code == 200
        assert open_stream(first_two, one, logs).status_code == 200  # a followed log counts too
        refused = open_stream(later, one, metrics)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "--max-streams-per-client 2" in refused.read().decode()
        # What is no stream is not counted: the log without follow, the job, the metric history.
        for path in (f"/v1/jobs/{job}/logs?follow=false", f"/v1/jobs/{job}", f"/v1/jobs/{job}/metrics"):
            assert one.get(path).status_code == 200, path

        assert open_stream(later, two, metrics).status_code == 200  # another client: its own share
        full = open_stream(later, two, logs)
        assert full.status_code == 429 and "(--max-streams)" in full.read().decode()

        first_two.close()  # the first client goes away: its slots come back once the server sees it

        def opened() -> bool:
            with one.stream("GET", metrics) as response:
                return response.status_code == 200

        wait_for(opened, what="a slot given back by a closed stream", timeout_s=60)
