"""The compose file's `cpu` profile, run as plain processes (there is no Docker engine here).

Each service is started the way its container would start it: the image's ENTRYPOINT (`dflash`,
run as `python -m services.cli.main`) plus compose's `command`, with the image's ENV and
compose's `environment` as resolved by `docker-compose config`. Only what Docker itself provides
is stood in for: service hostnames become 127.0.0.1, every container port a free local port,
`0.0.0.0` becomes 127.0.0.1, and each named volume a folder (one folder per volume, so services
that share a volume share the folder). Services start in `depends_on` order, each once its
dependencies pass their compose healthcheck, which is itself run as a process.

Then: the control plane lists the trainer agent as live, a job submitted over REST is claimed
by the agent and trains against the hidden-state service, its checkpoints land on the shared
volume, and SIGTERM stops every service cleanly.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.deploy.harness import REPO, compose_config, dockerfile_entrypoint, dockerfile_env

pytestmark = pytest.mark.slow

CPU_PROFILE = ["control-plane", "hidden-states-cpu", "trainer-cpu"]
HEALTHY_WITHIN_S = 240.0
STOP_WITHIN_S = 60.0
TRAINER_AGENT_MODULE = REPO / "services" / "cli" / "trainer_agent.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Localizer:
    """Rewrites what a container sees (hostnames, ports, mount paths) into this host's stand-ins."""

    config: dict
    root: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def port(self, service: str, container_port: int) -> int:
        return self.ports.setdefault((service, container_port), free_port())

    def volume_dir(self, volume: str) -> Path:
        path = self.root / "volumes" / volume
        path.mkdir(parents=True, exist_ok=True)
        return path

    def text(self, service: str, value: str) -> str:
        value = value.replace("0.0.0.0", "127.0.0.1")
        # The service's own ports: `--port=N`, `--payload-port=N`, and 127.0.0.1:N in its healthcheck.
        own = {port for name, port in self.ports if name == service}
        value = re.sub(
            r"^(--(?:payload-)?port=)(\d+)$",
            lambda m: f"{m.group(1)}{self.port(service, int(m.group(2)))}",
            value,
        )
        value = re.sub(
            r"(?<![\d.])127\.0\.0\.1:(\d+)",
            lambda m: (
                f"127.0.0.1:{self.port(service, int(m.group(1)))}" if int(m.group(1)) in own else m.group(0)
            ),
            value,
        )
        # Other services by name (longest first: `hidden-states-cpu` before `hidden-states`).
        for other in sorted(self.config["services"], key=len, reverse=True):
            value = re.sub(
                rf"(?<![\w.-]){re.escape(other)}:(\d+)",
                lambda m, o=other: f"127.0.0.1:{self.port(o, int(m.group(1)))}",
                value,
            )
        # Secrets: compose mounts each named file at /run/secrets/<name>.
        for secret in self.config["services"][service].get("secrets", []):
            name = secret if isinstance(secret, str) else secret["source"]
            value = value.replace(f"/run/secrets/{name}", self.config["secrets"][name]["file"])
        # Mount paths (longest first: /var/lib/dflash-agent before /var/lib/dflash).
        mounts = [v.split(":")[:2] for v in self.config["services"][service].get("volumes", [])]
        for volume, target in sorted(mounts, key=lambda m: len(m[1]), reverse=True):
            value = re.sub(rf"(?<![\w/.-]){re.escape(target)}(?=/|$)", str(self.volume_dir(volume)), value)
        return value

    def argv(self, service: str, argv: list[str]) -> list[str]:
        out: list[str] = []
        for i, item in enumerate(argv):
            if i > 0 and argv[i - 1] in ("--port", "--payload-port") and item.isdigit():
                out.append(str(self.port(service, int(item))))
            else:
                out.append(self.text(service, item))
        return out


def dflash_argv(argv: list[str]) -> list[str]:
    """The `dflash` console script as this interpreter runs it (the same `services.cli.main:main`)."""
    assert argv[0] == "dflash", argv
    return [sys.executable, "-m", "services.cli.main", *argv[1:]]


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    log: Path
    cwd: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.healthcheck, env=self.env, capture_output=True, text=True, timeout=60)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({' '.join(self.argv[3:])}):\n" + "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while True:
            result = self.check()
            if result.returncode == 0:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} not healthy: {result.stdout}{result.stderr}\n{self.tail()}"
                )
            time.sleep(1.0)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return None


@dataclass
class System:
    config: dict
    localizer: Localizer
    services: dict[str, Service]
    token: str  # the control plane's, from its secret file

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def url(self, service: str, port: int) -> str:
        return f"http://127.0.0.1:{self.localizer.port(service, port)}"

    def tails(self) -> str:
        return "\n".join(s.tail() for s in self.services.values())


def start_order(config: dict, names: list[str]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        for dependency in config["services"][name].get("depends_on", {}):
            visit(dependency)
        if name not in order:
            order.append(name)

    for name in names:
        visit(name)
    return order


def build_service(config: dict, localizer: Localizer, name: str, root: Path) -> Service:
    spec = config["services"][name]
    dockerfile = REPO / spec["build"]["dockerfile"]
    command = spec["command"]
    command = shlex.split(command) if isinstance(command, str) else list(command)
    container_env = {
        **dockerfile_env(dockerfile),
        **{k: str(v) for k, v in spec.get("environment", {}).items()},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DFLASH_", "HF_"))}
    env.update({k: localizer.text(name, v) for k, v in container_env.items()})
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    argv = dflash_argv(localizer.argv(name, [*dockerfile_entrypoint(dockerfile), *command]))
    check = spec["healthcheck"]["test"]
    assert check[0] == "CMD", check
    healthcheck = dflash_argv(localizer.argv(name, check[1:]))
    return Service(name, argv, env, healthcheck, log=root / f"{name}.log", cwd=root / "workdirs" / name)


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[System]:
    if not TRAINER_AGENT_MODULE.exists():
        pytest.skip("services/cli/trainer_agent.py (`dflash trainer-agent`) is not in this tree yet")
    root = tmp_path_factory.mktemp("cpu-profile")
    tokens = {
        "SERVICE_TOKEN_FILE": root / "service_token",
        "CONTROL_PLANE_TOKEN_FILE": root / "cp_token",
        "AGENT_TOKEN_FILE": root / "agent_token",
    }
    for path in tokens.values():
        path.write_text(secrets.token_hex(16) + "\n")
    tokens["HF_TOKEN_FILE"] = root / "hf_token"
    tokens["HF_TOKEN_FILE"].write_text("")  # no Hugging Face token: the embedded verifier needs none
    config = compose_config(root, variables={name: str(path) for name, path in tokens.items()})
    localizer = Localizer(config, root)
    # Allocate every service's own ports before any rewriting refers to them.
    for name in CPU_PROFILE:
        for item in config["services"][name]["command"]:
            if m := re.match(r"--(?:payload-)?port=(\d+)$", str(item)):
                localizer.port(name, int(m.group(1)))
    services = {
        name: build_service(config, localizer, name, root) for name in start_order(config, CPU_PROFILE)
    }
    running = System(
        config, localizer, services, token=tokens["CONTROL_PLANE_TOKEN_FILE"].read_text().strip()
    )
    try:
        for service in services.values():
            service.start()
            service.wait_healthy()
        yield running
    finally:
        for service in reversed(services.values()):
            service.stop()


def test_every_service_passes_its_healthcheck(system):
    for service in system.services.values():
        result = service.check()
        assert result.returncode == 0, f"{service.name}: {result.stdout}{result.stderr}\n{system.tails()}"
    # The checks really look: a service that is not there fails them.
    control_plane = system.services["control-plane"]
    dead = [*control_plane.healthcheck[:-1], f"http://127.0.0.1:{free_port()}/healthz"]
    assert subprocess.run(dead, env=control_plane.env, capture_output=True, timeout=60).returncode == 1


def test_the_control_plane_sees_the_trainer_agent(system):
    agents = httpx.get(
        system.url("control-plane", 8600) + "/v1/agents", headers=system.auth, timeout=10
    ).json()
    expected = system.services["trainer-cpu"].env["DFLASH_AGENT_NAME"]
    (agent,) = [a for a in agents if a["name"] == expected]
    assert agent["state"] == "live" and agent["gpus"] == []
    health = httpx.get(system.url("control-plane", 8600) + "/healthz", timeout=10).json()
    assert health["executor"] == "agent"


def test_a_job_trains_across_the_three_services(system):
    """Data prepared with the trainer image's command, a job submitted over REST with container
    paths and the service's compose hostname: the agent claims it and trains on hidden states
    streamed from the hidden-state service; the checkpoints land on the shared volume."""
    trainer = system.services["trainer-cpu"]
    localize = system.localizer.text
    data = localize("trainer-cpu", "/data/chitchat-tiny")
    prepare = dflash_argv(
        [
            "dflash",
            "prepare-data",
            "--data",
            "chitchat",
            "--output",
            data,
            "--max-samples",
            "24",
            "--seq-length",
            "128",
        ]
    )
    result = subprocess.run(
        prepare, env=trainer.env, cwd=trainer.cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job = {
        "name": "compose-cpu",
        "gpus": 0,
        "data_path": localize("control-plane", "/data/chitchat-tiny"),
        "hidden_states_endpoint": [localize("trainer-cpu", "hidden-states-cpu:8000")],
        "num_layers": 1,
        "block_size": 4,
        "max_anchors": 16,
        "total_seq_len": 256,
        "epochs": 1,
        "max_steps": 2,
        "val_fraction": 0.2,
        "compile": False,
        "report_to": ["jsonl"],
    }
    base = system.url("control-plane", 8600)
    assert httpx.post(base + "/v1/jobs", json=job, timeout=30).status_code == 401  # the token is on
    submitted = httpx.post(base + "/v1/jobs", json=job, headers=system.auth, timeout=30)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 600
    while True:
        state = httpx.get(f"{base}/v1/jobs/{job_id}", headers=system.auth, timeout=10).json()
        if state["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    log = httpx.get(
        f"{base}/v1/jobs/{job_id}/logs", params={"lines": 200}, headers=system.auth, timeout=10
    ).text
    assert state["state"] == "succeeded", f"{state}\n{log}\n{system.tails()}"
    save_path = Path(state["config"]["save_path"])
    assert save_path.is_relative_to(system.localizer.volume_dir("checkpoints"))
    assert (save_path / "latest" / "model.safetensors").is_file()


def test_every_service_stops_cleanly_on_sigterm(system):
    """Within the grace period (stop() says None after a SIGKILL). uvicorn drains, then re-raises
    the signal so that its exit status says it was stopped: -SIGTERM here, 143 in a container."""
    for service in reversed(system.services.values()):
        code = service.stop()
        clean = (0, -signal.SIGTERM) if service.name == "control-plane" else (0,)
        assert code in clean, f"{service.name} exited with {code} on SIGTERM\n{service.tail()}"
    assert "Application shutdown complete" in system.services["control-plane"].tail()
