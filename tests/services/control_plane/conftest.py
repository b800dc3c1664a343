"""Fixtures: control planes started on 127.0.0.1 against a real SQLite file, and a tiny training
workspace (tiny random verifier + prepared chats) under the data root."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories.training import make_training_workspace, train_config
from tests.services.control_plane.harness import ControlPlaneServer, kill_groups, settings_for


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ControlPlaneServer]]:
    """`start_server(**settings)` → a running control plane; all stopped (and their jobs' processes
    killed) at the end of the test."""
    servers: list[ControlPlaneServer] = []

    def start(*, token: str | None = None, **overrides: Any) -> ControlPlaneServer:
        if token is not None:
            overrides["token"] = token
        server = ControlPlaneServer(settings_for(tmp_path, **overrides), token=token)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.client.is_closed:  # stopped by the test itself
            continue
        pids = server.active_pids()
        server.stop()
        kill_groups(pids)


@pytest.fixture
def server(start_server: Callable[..., ControlPlaneServer]) -> ControlPlaneServer:
    """A control plane that starts nothing (max_concurrent_jobs=0): jobs stay queued."""
    return start_server(max_concurrent_jobs=0)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny verifier and prepared data; its folder is the data root of the training tests."""
    return make_training_workspace(tmp_path_factory.mktemp("cp-workspace"))


def tiny_job(workspace: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    """A job body for a tiny CPU run (seconds), as a user would POST it: no save_path (the
    control plane picks one), metrics to metrics.jsonl besides the control plane."""
    fields = {"report_to": ["jsonl"], **overrides}
    name = fields.pop("name", None)
    gpus = fields.pop("gpus", None)
    config = train_config(workspace, "unused", **fields)
    body = config.model_dump(mode="json", exclude_defaults=True, exclude={"save_path"})
    body.update(report_to=fields["report_to"])
    if name is not None:
        body["name"] = name
    if gpus is not None:
        body["gpus"] = gpus
    return body
