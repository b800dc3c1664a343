"""Running control planes for the tests: the real app under uvicorn on 127.0.0.1, a real SQLite file.

    server = ControlPlaneServer(settings_for(tmp_path, max_concurrent_jobs=0))   # in a thread
    process = ControlPlaneProcess(args, port=...)                                # `dflash control-plane`
    server.client.post("/v1/jobs", json=job_body(...))

Waiting is by polling with a generous deadline: the deadline only turns a hang into a failure,
nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from services.control_plane.main import create_app
from services.control_plane.settings import ControlPlaneSettings

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "cp-test-token-7f3a91c2"  # distinctive, so a leak is found by a plain substring search
AGENT_TOKENS = {"agent-a": "cp-agent-a-token-41d0e8", None: "cp-any-agent-token-9b27c5"}  # None: any name
LONG_S = 240.0  # deadline for things that involve a training run on a busy 2-core machine


def wait_for(
    condition: Callable[[], Any], *, what: str, timeout_s: float = LONG_S, every_s: float = 0.05
) -> Any:
    """Poll until `condition()` is truthy and return its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_for(tmp: Path, **overrides: Any) -> ControlPlaneSettings:
    """Settings over a fresh layout under `tmp`: data/, checkpoints/, jobs.db (+ jobs.db.jobs/)."""
    values: dict[str, Any] = {
        "db": str(tmp / "jobs.db"),
        "data_root": tmp / "data",
        "checkpoint_root": tmp / "checkpoints",
        "gpus": [],
        "poll_interval_s": 0.2,
        "token": None,
    }
    values.update(overrides)
    (Path(values["data_root"])).mkdir(parents=True, exist_ok=True)
    return ControlPlaneSettings(**values)


def write_agent_tokens(path: Path, tokens: dict[str | None, str] = AGENT_TOKENS) -> Path:
    """An --agent-token-file: `NAME TOKEN` lines, a bare `TOKEN` for None (any agent name)."""
    path.write_text(
        "".join(f"{token}\n" if name is None else f"{name} {token}\n" for name, token in tokens.items())
    )
    return path


class Api:
    """httpx client with the helpers the tests share."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        headers = {"X-DFlash-Client": "tests", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=60)

    def job(self, job_id: str) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}")
        response.raise_for_status()
        return response.json()

    def submit(self, body: dict, *, expect: int = 201) -> dict:
        response = self.client.post("/v1/jobs", json=body)
        assert response.status_code == expect, response.text
        return response.json()

    def wait_state(self, job_id: str, *states: str, timeout_s: float = LONG_S) -> dict:
        def reached() -> dict | None:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            return None

        try:
            return wait_for(reached, what=f"job {job_id} to be {' or '.join(states)}", timeout_s=timeout_s)
        except AssertionError:
            job = self.job(job_id)
            log = self.client.get(f"/v1/jobs/{job_id}/logs", params={"lines": 60}).text
            raise AssertionError(
                f"job {job_id} is {job['state']} (reason: {job['reason']}), not {states}; log:\n{log}"
            ) from None

    def wait_pid(self, job_id: str) -> int:
        return wait_for(lambda: self.job(job_id)["pid"], what=f"job {job_id} to have a process")

    def metric_rows(self, job_id: str, **params: Any) -> list[dict]:
        response = self.client.get(f"/v1/jobs/{job_id}/metrics", params=params)
        response.raise_for_status()
        return response.json()["data"]

    def ticks(self) -> int:
        return self.client.get("/healthz").json()["scheduler_ticks"]

    def wait_ticks(self, passes: int) -> None:
        """Let the scheduler run `passes` more full passes (each would have started what fits)."""
        target = self.ticks() + passes
        wait_for(lambda: self.ticks() >= target, what=f"{passes} scheduler passes", timeout_s=60)

    def active_pids(self) -> list[int]:
        response = self.client.get("/v1/jobs", params={"state": ["starting", "running"], "limit": 500})
        return [job["pid"] for job in response.json()["data"] if job["pid"]]

    def close(self) -> None:
        self.client.close()


class ControlPlaneServer(Api):
    """create_app(settings) under uvicorn in a thread of the test process."""

    def __init__(self, settings: ControlPlaneSettings, *, token: str | None = None) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # bound now, so the port is known before the app is built
        port = sock.getsockname()[1]
        self.settings = settings.model_copy(update={"port": port})
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        wait_for(lambda: self.server.started, what="the control plane to start", timeout_s=60)
        super().__init__(f"http://127.0.0.1:{port}", token=token)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self.close()


class ControlPlaneProcess(Api):
    """`python -m services.cli.main control-plane ...` in its own process (killable for real)."""

    def __init__(self, args: list[str], *, port: int, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "services.cli.main", "control-plane", "--port", str(port), *args]
        # Output to a file, not a pipe nobody reads: a full pipe would stall the service.
        self._output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        super().__init__(f"http://127.0.0.1:{port}", token=(env or {}).get("DFLASH_CONTROL_PLANE_TOKEN"))

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"control plane exited {self.process.returncode}:\n{self.output()}")
            try:
                return self.client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, what="the control plane process to answer", timeout_s=120, every_s=0.1)

    def output(self) -> str:
        self._output.seek(0)
        return self._output.read()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a host loses the process."""
        self.process.kill()
        self.process.wait(timeout=60)
        self.close()


# ---------------------------------------------------------------------- trainer processes
def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def trainer_of(launcher_pid: int) -> int:
    """The trainer process the job's launcher started."""
    children = wait_for(lambda: children_of(launcher_pid), what=f"the trainer under launcher {launcher_pid}")
    assert len(children) == 1, children
    return children[0]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def cmdline_of(pid: int) -> list[str]:
    return [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part]


def kill_groups(pids: list[int]) -> None:
    """End jobs' process groups (each launcher leads its own): no trainer outlives a test."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- events
def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Parse a text/event-stream into {"event", "id", "data"} dicts (comments skipped)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        event[name] = f"{event[name]}\n{value}" if name == "data" and name in event else value


def next_event(events: Iterator[dict[str, str]], name: str) -> dict[str, Any]:
    """The next event called `name` (skipping others), with its data parsed as JSON."""
    for event in events:
        if event.get("event") == name:
            return {**event, "data": json.loads(event["data"])}
    raise AssertionError(f"stream ended before a {name!r} event")
