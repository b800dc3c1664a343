"""`dflash slurm-hidden-states`: the batch script it writes starts a real service, registers it
where the control plane finds it, a job names it and trains from it, and scancel's SIGTERM
deregisters it; bad settings are refused before any script is written.

No Slurm here: the script is run by bash with the variables Slurm would set, the service bound
to 127.0.0.1 and registered as 127.0.0.1 (DFLASH_BIND_HOST, DFLASH_ADVERTISE_HOST).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.main import main
from services.hidden_states.registry import read_registry
from tests.factories.training import make_training_workspace
from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import ControlPlaneServer, free_port, settings_for, wait_for

DFLASH = Path(sys.executable).with_name("dflash")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_workspace(tmp_path_factory.mktemp("slurm-workspace"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "service_token"
    path.write_text("s3cret-for-the-service\n")
    return path


def stop_group(batch: subprocess.Popen) -> None:
    """SIGKILL to the script and every process it started (its own session): nothing outlives a test."""
    if batch.poll() is None:
        os.killpg(batch.pid, signal.SIGKILL)
        batch.wait()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(batch.pid, signal.SIGKILL)


def write_script(tmp_path: Path, *args: str) -> tuple[int, str]:
    """(exit status, script text) of `dflash slurm-hidden-states ARGS --out <tmp>/job.sbatch`."""
    out = tmp_path / "job.sbatch"
    code = main(["slurm-hidden-states", "--out", str(out), *args])
    return code, out.read_text() if out.exists() else ""


def test_the_script_registers_a_service_a_job_trains_from(tmp_path, workspace, token_file, monkeypatch):
    registry = tmp_path / "registry"
    port, payload_port = free_port(), free_port()
    code, script = write_script(
        tmp_path,
        "--name", "tiny-verifier",
        "--registry", str(registry),
        "--partition", "gpu",
        "--gpus-per-node", "2",
        "--time", "2-00:00:00",
        "--port", str(port),
        "--payload-port", str(payload_port),
        "--",
        str(workspace["verifier"]),
        "--target-layer-ids", "1", "2",
        "--device", "cpu",
        "--dtype", "float32",
        "--token-file", str(token_file),
    )  # fmt: skip
    assert code == 0
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=2-00:00:00"):
        assert line in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0

    slurm_env = {
        **os.environ,
        "SLURM_JOB_ID": "4242",
        "SLURMD_NODENAME": "gpu-07",
        "DFLASH": str(DFLASH),
        "DFLASH_BIND_HOST": "127.0.0.1",
        "DFLASH_ADVERTISE_HOST": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    log = (tmp_path / "job.out").open("w")
    batch = subprocess.Popen(
        ["bash", str(tmp_path / "job.sbatch")],
        env=slurm_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        entry = registry / "tiny-verifier.endpoint"
        wait_for(entry.exists, what="the script to register the service", timeout_s=300)
        assert entry.read_text().splitlines()[0] == f"127.0.0.1:{port}"
        assert "slurm job 4242 on gpu-07" in entry.read_text()

        # The control plane and its trainers reach the service with its token, from the environment.
        monkeypatch.setenv("DFLASH_SERVICE_TOKEN_FILE", str(token_file))
        settings = settings_for(
            tmp_path, data_root=workspace["root"], max_concurrent_jobs=1, hidden_states_registry=registry
        )
        server = ControlPlaneServer(settings)
        try:
            (listed,) = server.client.get("/v1/hidden-state-services").json()
            assert listed["endpoint"] == f"127.0.0.1:{port}" and listed["registered_as"] == "tiny-verifier"
            assert listed["status"] == "serving" and listed["info"]["layer_ids"][:2] == [1, 2]

            unknown = tiny_job(workspace, hidden_states_endpoint=["registry:nope"], target_layer_ids=[1, 2])
            refused = server.client.post("/v1/jobs", json=unknown)
            assert refused.status_code == 422 and "registered: tiny-verifier" in refused.text

            named = ["registry:tiny-verifier"]
            job = server.submit(tiny_job(workspace, hidden_states_endpoint=named, target_layer_ids=[1, 2]))
            assert job["config"]["hidden_states_endpoint"] == [f"127.0.0.1:{port}"]
            done = server.wait_state(job["id"], "succeeded", "failed")
            assert done["state"] == "succeeded", done["reason"]
        finally:
            server.stop()

        # scancel: SIGTERM to the batch shell; it deregisters first, then the service drains.
        batch.send_signal(signal.SIGTERM)
        assert batch.wait(timeout=120) == 0
        assert not entry.exists() and read_registry(registry) == {}
    finally:
        stop_group(batch)
        log.close()
        print((tmp_path / "job.out").read_text())  # shown when the test fails


def test_a_newer_copy_keeps_its_entry_when_an_older_one_stops(tmp_path, token_file):
    """Resubmitted under the same name, the old job's exit must not deregister the new one."""
    registry = tmp_path / "registry"
    registry.mkdir()
    entry = registry / "q.endpoint"
    code, _ = write_script(tmp_path, "--name", "q", "--registry", str(registry), "--", "--insecure")
    assert code == 0
    # A stand-in `dflash`: the service sleeps, health answers at once.
    fake = tmp_path / "fake-dflash"
    fake.write_text('#!/bin/bash\nif [ "$1" = serve-hidden-states ]; then exec sleep 600; fi\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "DFLASH": str(fake), "DFLASH_ADVERTISE_HOST": "old-node"}
    batch = subprocess.Popen(
        ["bash", str(tmp_path / "job.sbatch")], env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(entry.exists, what="the old copy to register", timeout_s=60)
        entry.write_text("new-node:8000\n")  # the newer copy registered since
        batch.send_signal(signal.SIGTERM)
        batch.wait(timeout=60)
        assert entry.read_text() == "new-node:8000\n"
    finally:
        stop_group(batch)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--name", "no spaces"], "--name: service name 'no spaces'"),
        (["--name", "q", "--time", "two days"], "--time 'two days' is no Slurm time limit"),
        (["--name", "q", "--port", "8001"], "--port and --payload-port are both 8001"),
        (["--name", "q", "--", "--host", "0.0.0.0", "--insecure"], "--host after `--` is the script's"),
        (["--name", "q", "--", "--port=9000", "--insecure"], "use this command's --port"),
        (["--name", "q", "--", "--backend", "sglang", "--insecure"], "invalid choice: 'sglang'"),
        (["--name", "q", "--", "--max-length", "0", "--insecure"], "--max-length"),
        (["--name", "q", "--", "Qwen/Qwen3-8B"], "give it a token with --token-file"),
        (["--name", "q", "--", "--token-file", "/nowhere/tok"], "--token-file /nowhere/tok: no such file"),
    ],
)
def test_bad_settings_are_refused_with_the_flag_named(tmp_path, capsys, args, complaint):
    code, script = write_script(tmp_path, "--registry", str(tmp_path / "registry"), *args)
    assert code == 2 and script == ""
    assert complaint in capsys.readouterr().err


def fake_dflash(tmp_path: Path, *, service: str) -> Path:
    """A stand-in `dflash`: `serve-hidden-states` runs `service` (shell); `healthcheck` passes once
    <tmp>/ready exists."""
    fake = tmp_path / "fake-dflash"
    fake.write_text(
        f'#!/bin/bash\nif [ "$1" = serve-hidden-states ]; then {service}; fi\n[ -e {tmp_path / "ready"} ]\n'
    )
    fake.chmod(0o755)
    return fake


def test_nothing_is_registered_before_health_answers_or_when_the_service_dies(tmp_path):
    registry = tmp_path / "registry"
    entry = registry / "q.endpoint"
    assert write_script(tmp_path, "--name", "q", "--registry", str(registry), "--", "--insecure")[0] == 0
    env = {**os.environ, "DFLASH_ADVERTISE_HOST": "node"}
    script = ["bash", str(tmp_path / "job.sbatch")]

    env["DFLASH"] = str(fake_dflash(tmp_path, service="exec sleep 600"))
    batch = subprocess.Popen(script, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(registry.is_dir, what="the script to start", timeout_s=60)
        with pytest.raises(AssertionError):  # health fails: no entry, however long it waits
            wait_for(entry.exists, what="an entry", timeout_s=7)
        (tmp_path / "ready").touch()
        wait_for(entry.exists, what="the entry once health answers", timeout_s=60)
    finally:
        stop_group(batch)
    entry.unlink()
    (tmp_path / "ready").unlink()

    # A service that dies while loading: the script ends with its status, nothing registered.
    env["DFLASH"] = str(fake_dflash(tmp_path, service="exit 3"))
    assert (
        subprocess.run(
            script, env=env, stdout=subprocess.DEVNULL, timeout=120, start_new_session=True
        ).returncode
        == 3
    )
    assert not entry.exists()
