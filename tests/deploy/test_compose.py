"""docker-compose.yml: valid for compose (GPU reservations included), wired as the tutorial lays
the node out, documented in .env.example, and every command is one the real `dflash` CLI takes.

Validation is Debian's `docker-compose` (1.29, `make deploy-env`): `docker-compose config`
checks the file against compose's JSON schema (which covers `deploy.resources.reservations.
devices`) and resolves variables without talking to a Docker engine. A schema check of our own
would only repeat that schema, so the tool that users run is the one CI runs.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy.harness import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    REPO,
    cli_problems,
    compose_config,
    dockerfile_entrypoint,
)

GPU_SERVICES = {"hidden-states", "trainer"}
CPU_SERVICES = {"hidden-states-cpu", "trainer-cpu"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return compose_config(tmp_path_factory.mktemp("compose"))


def command_of(service: dict) -> list[str]:
    """The container's argv after the image's ENTRYPOINT (compose splits a string like a shell)."""
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_services_profiles_and_volumes(config):
    services = config["services"]
    assert set(services) == {"hidden-states", "trainer", "control-plane"} | CPU_SERVICES
    # `docker compose up` (no profile) is the GPU system; the cpu profile only adds its own pair.
    for name in ("hidden-states", "trainer", "control-plane"):
        assert "profiles" not in services[name], name
    for name in CPU_SERVICES:
        assert services[name]["profiles"] == ["cpu"], name
    assert {"hf-cache", "datasets", "checkpoints"} <= set(config["volumes"])


def test_gpus_are_pinned_per_service_from_variables(tmp_path, config):
    def device_ids(cfg, name):
        (device,) = cfg["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        return device["device_ids"]

    # The tutorial's layout by default: vLLM on GPUs 0-1, the trainer on 2-3.
    assert device_ids(config, "hidden-states") == ["0,1"] and device_ids(config, "trainer") == ["2,3"]
    moved = compose_config(tmp_path, variables={"HIDDEN_STATES_GPU_IDS": "4", "TRAINER_GPU_IDS": "5,6,7"})
    assert device_ids(moved, "hidden-states") == ["4"] and device_ids(moved, "trainer") == ["5,6,7"]
    for name in CPU_SERVICES | {"control-plane"}:
        resources = config["services"][name].get("deploy", {}).get("resources", {})
        assert "reservations" not in resources, f"{name} must run without GPUs"


def test_compose_config_rejects_a_broken_gpu_reservation(tmp_path):
    """The validator really checks the reservation section (a typo there must fail CI)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("device_ids:", "device_id:", 1))
    with pytest.raises(AssertionError, match="docker-compose config failed") as refused:
        compose_config(tmp_path, compose_file=broken)
    assert "device_id" in str(refused.value)


def test_vllm_parallelism_and_engine_arguments_pass_through(tmp_path):
    variables = {
        "VLLM_TENSOR_PARALLEL_SIZE": "4",
        "VLLM_DATA_PARALLEL_SIZE": "1",
        "VLLM_EXTRA_ARGS": "--max-model-len 16384 --kv-cache-dtype fp8",
        "VERIFIER": "meta-llama/Llama-3.1-8B-Instruct",
        "TARGET_LAYER_IDS": "1,16,29",
    }
    service = compose_config(tmp_path, variables=variables)["services"]["hidden-states"]
    argv = command_of(service)
    engine = argv[argv.index("--") + 1 :]
    assert engine[engine.index("--tensor-parallel-size") + 1] == "4"
    assert engine[engine.index("--data-parallel-size") + 1] == "1"
    assert engine[-4:] == ["--max-model-len", "16384", "--kv-cache-dtype", "fp8"]
    assert service["environment"]["DFLASH_MODEL"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert service["environment"]["DFLASH_TARGET_LAYER_IDS"] == "1,16,29"
    assert "--backend" in argv and argv[argv.index("--backend") + 1] == "vllm"


def test_startup_is_ordered_on_health(config):
    services = config["services"]
    for trainer, hidden_states in (("trainer", "hidden-states"), ("trainer-cpu", "hidden-states-cpu")):
        assert services[trainer]["depends_on"] == {
            "control-plane": {"condition": "service_healthy"},
            hidden_states: {"condition": "service_healthy"},
        }
    for name, service in services.items():
        assert service["healthcheck"]["test"][:3] == ["CMD", "dflash", "healthcheck"], name


def test_trainers_and_control_plane_share_data_and_checkpoints_at_the_same_paths(config):
    services = config["services"]

    def mounts(name):
        return {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}

    control_plane = mounts("control-plane")
    command = command_of(services["control-plane"])
    assert f"--data-root={control_plane['datasets']}" in command
    assert f"--checkpoint-root={control_plane['checkpoints']}" in command
    assert "--executor=agent" in command
    for trainer in ("trainer", "trainer-cpu"):
        ours = mounts(trainer)
        for volume in ("datasets", "checkpoints"):
            assert ours[volume] == control_plane[volume], (trainer, volume)
        assert services[trainer]["environment"]["DFLASH_AGENT_CONTROL_PLANE"] == "http://control-plane:8600"
    assert mounts("trainer")["trainer-state"] != mounts("trainer-cpu").get("trainer-state")


@pytest.mark.parametrize(
    "name", ["hidden-states", "trainer", "control-plane", "hidden-states-cpu", "trainer-cpu"]
)
def test_each_command_and_variable_is_one_the_cli_has(config, name):
    """The image's ENTRYPOINT plus compose's command must parse with the real `dflash` parser,
    and every DFLASH_* variable must be one that subcommand reads."""
    service = config["services"][name]
    entrypoint = dockerfile_entrypoint(REPO / service["build"]["dockerfile"])
    assert entrypoint == ["dflash"]
    assert cli_problems(command_of(service), service.get("environment", {})) == []
    healthcheck = service["healthcheck"]["test"]
    assert cli_problems(healthcheck[2:]) == []


def test_the_cli_check_catches_commands_the_cli_does_not_have(config):
    """The check above is not vacuous: a renamed subcommand, flag or variable is caught."""
    service = config["services"]["control-plane"]
    command = command_of(service)
    assert cli_problems(["control-plane-v2", *command[1:]])
    assert cli_problems([*command, "--executer=agent"])
    assert cli_problems(command, {"DFLASH_CONTROL_PLANE_DATAROOT": "/data"})
    assert cli_problems(["trainer-agent"], {"DFLASH_TARGET_LAYER_IDS": "1 2"})  # not the agent's
    assert cli_problems(["serve-hidden-states", "--backend", "sglang"])
    # A job-config variable without the switch would be ignored in the container.
    hidden_states = dict(config["services"]["hidden-states"]["environment"])
    assert cli_problems(["serve-hidden-states"], hidden_states) == []
    del hidden_states["DFLASH_CONFIG_FROM_ENV"]
    assert sorted(cli_problems(["serve-hidden-states"], hidden_states)) == [
        f"${name}: ignored without $DFLASH_CONFIG_FROM_ENV=1"
        for name in ("DFLASH_MAX_LENGTH", "DFLASH_MODEL", "DFLASH_TARGET_LAYER_IDS")
    ]


def test_env_example_documents_every_variable_with_the_compose_defaults(tmp_path, config):
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    documented = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == documented, f"missing in .env.example: {used - documented}; unused: {documented - used}"
    # Copying .env.example to .env changes nothing: its values are the file's defaults.
    assert compose_config(tmp_path, env_file=ENV_EXAMPLE) == config


def test_every_container_is_hardened_and_holds_no_secret_in_its_environment(config):
    """No privilege escalation, no capabilities, a memory limit, no host IPC namespace; tokens come
    from secret files mounted at /run/secrets, never from variables (`docker inspect` shows those)."""
    for name, service in config["services"].items():
        assert service.get("security_opt") == ["no-new-privileges:true"], name
        assert service.get("cap_drop") == ["ALL"], name
        assert service["deploy"]["resources"]["limits"]["memory"], name
        assert "ipc" not in service, name
        environment = service.get("environment", {})
        for variable, value in environment.items():
            if "TOKEN" in variable:  # HF_TOKEN_PATH is huggingface_hub's name for its token file
                assert variable.endswith(("_FILE", "_PATH")), (name, variable)
                assert str(value).startswith("/run/secrets/"), (name, variable)
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        wanted = {str(v).removeprefix("/run/secrets/") for v in environment.values()} & set(config["secrets"])
        assert wanted <= mounted, (name, wanted - mounted)
    # The hidden-state services read their token from the secret (they listen beyond loopback).
    for name in ("hidden-states", "hidden-states-cpu"):
        command = " ".join(command_of(config["services"][name]))
        assert "--token-file /run/secrets/service_token" in command.replace("=", " "), name


def test_trainer_containers_hold_the_agent_token_not_the_admin_one(config):
    """A trainer host runs jobs: it gets the agents' token (the agent routes only), never the
    control plane's admin token; the control plane reads both."""
    for name in ("trainer", "trainer-cpu"):
        service = config["services"][name]
        mounted = {s if isinstance(s, str) else s["source"] for s in service["secrets"]}
        assert mounted == {"service_token", "agent_token", "hf_token"}, name
        assert service["environment"]["DFLASH_AGENT_TOKEN_FILE"] == "/run/secrets/agent_token", name
    control_plane = config["services"]["control-plane"]
    environment = control_plane["environment"]
    assert environment["DFLASH_CONTROL_PLANE_TOKEN_FILE"] == "/run/secrets/control_plane_token"
    assert environment["DFLASH_CONTROL_PLANE_AGENT_TOKEN_FILE"] == "/run/secrets/agent_token"
