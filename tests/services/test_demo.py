"""`dflash demo` as a user runs it, in a process of its own: data, hidden-state service, control
plane, a job over REST followed with a progress bar, a final `dflash eval`, and nothing left
running afterwards, whether it finished or was stopped with Ctrl-C.

Tiny settings (20 conversations, a few steps) on the real SmolLM2. Afterwards the job is read back
over REST from a control plane started on the demo's own database. Ctrl-C is sent the way a
terminal sends it: SIGINT to the demo's whole process group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.control_plane.client import JobsClient
from services.control_plane.settings import ControlPlaneSettings
from tests.services.control_plane.harness import ROOT, ControlPlaneServer, free_port, wait_for

pytestmark = pytest.mark.slow

TINY = ["--max-samples", "20", "--seq-length", "256", "--total-seq-len", "512", "--max-anchors", "32"]


def start_demo(output: Path, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
    """The demo in a session of its own (as a shell runs a foreground job); its output in a file."""
    log = output.with_suffix(".out")
    command = [sys.executable, "-m", "services.cli.main", "demo", "--output-dir", str(output)]
    with log.open("w") as file:
        process = subprocess.Popen(
            [*command, "--port", str(port), *TINY, *args],
            cwd=ROOT,
            stdout=file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


def processes_left(output: Path, session: int) -> list[str]:
    """Live processes of the demo's session, or naming its output folder (the control plane and
    the trainer run in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] != "Z" and (int(stat[3]) == session or str(output) in cmdline):
            found.append(f"{entry.name}: {cmdline}")
    return found


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(output: Path, demo: subprocess.Popen, text: str) -> None:
    assert processes_left(output, demo.pid) == []
    service_port = int(re.search(r"hidden-state service on 127\.0\.0\.1:(\d+)", text).group(1))
    control_port = int(re.search(r"control plane on http://127\.0\.0\.1:(\d+)", text).group(1))
    assert not port_open(service_port) and not port_open(control_port)


def read_back(output: Path) -> ControlPlaneServer:
    """A control plane on the demo's database, to read its job over REST."""
    settings = ControlPlaneSettings(
        db=str(output / "control-plane.db"),
        data_root=output,
        checkpoint_root=output / "checkpoints",
        gpus=[],
        token=None,
        max_concurrent_jobs=0,
    )
    return ControlPlaneServer(settings)


def test_demo_trains_over_rest_evaluates_and_leaves_nothing_running(tmp_path):
    output = tmp_path / "demo"
    demo, log = start_demo(
        output, free_port(), "--max-steps", "3", "--eval-num-prompts", "1", "--eval-max-new-tokens", "8"
    )
    try:
        assert demo.wait(timeout=600) == 0, log.read_text()
    finally:
        demo.kill()
    text = log.read_text()
    job_id = re.search(r"submitted job (\S+)", text).group(1)
    assert f"/jobs/{job_id}" in text  # the dashboard's page of the job
    assert re.search(r"training: 100%\|.*\| 3/3 ", text), text  # the progress bar reached the end
    assert "validation before training" in text and f"job {job_id} succeeded" in text
    assert re.search(r"tau \(mean acceptance length\)\s+\d\.\d{3}", text) and "tokens/s with drafter" in text
    # Live acceptance during training (before the first step and at the run's end), in the bar too.
    assert re.search(r"live acceptance at step 0: tau \d\.\d{3}", text), text
    assert re.search(r"live acceptance at step 3: tau \d\.\d{3}", text), text
    assert_nothing_left(output, demo, text)

    server = read_back(output)
    try:
        job = server.job(job_id)
        assert job["state"] == "succeeded" and job["step"] == 3
        assert job["config"]["hidden_states_endpoint"]  # trained on the service's hidden states
        listing = server.client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert listing["checkpoint_best"] == "0"
        assert (Path(listing["save_path"]) / "checkpoint_best" / "model.safetensors").is_file()
    finally:
        server.stop()


def test_ctrl_c_cancels_the_job_with_a_checkpoint_and_stops_everything(tmp_path):
    output, port = tmp_path / "demo", free_port()
    demo, log = start_demo(output, port, "--epochs", "20", "--eval-num-prompts", "0")
    try:
        job_id = wait_for(
            lambda: (m := re.search(r"submitted job (\S+)", log.read_text())) and m.group(1),
            what="the demo to submit its job",
            timeout_s=300,
            every_s=0.5,
        )
        # Reading the job needs the token too: the demo's control plane keeps it beside its store.
        token = (output / "control-plane.token").read_text().strip()
        jobs = JobsClient(f"http://127.0.0.1:{port}", token=token)
        wait_for(lambda: (jobs.job(job_id)["step"] or 0) >= 2, what="two steps", every_s=0.5)
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert demo.wait(timeout=300) == 130, log.read_text()
    finally:
        demo.kill()
    text = log.read_text()
    assert f"cancelling job {job_id}" in text and f"job {job_id} cancelled" in text, text
    assert_nothing_left(output, demo, text)

    server = read_back(output)
    try:
        job = server.job(job_id)
        assert job["state"] == "cancelled" and job["exit_code"] == 143, job
        listing = server.client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        latest = next(c for c in listing["data"] if c["name"] == listing["latest"])
        assert latest["kind"] == "step" and latest["step"] >= 2  # written on the cancel's SIGTERM
    finally:
        server.stop()
