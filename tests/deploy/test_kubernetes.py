"""deploy/kubernetes/: every manifest is valid for a pinned Kubernetes version, and the pieces fit
together: each container runs a command the real CLI takes, probes and Services reach the ports
those commands open, every Secret key, claim and ConfigMap a pod names exists, GPU requests
match the engine's parallelism, and every pod runs as the images' non-root user.

Validation is `kubernetes-validate` (`make deploy-env`), which ships the Kubernetes JSON schemas
in its wheel: nothing is fetched (a test below forbids the network while it validates). There is
no API server and no kustomize here, so the Secret that kustomization.yaml's secretGenerator
makes is built here the way kustomize builds it, and validated with the rest.
"""

from __future__ import annotations

import base64
import copy
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from dflash_core.config_args import split_passthrough
from services.cli.main import build_parser
from tests.deploy.harness import (
    COMPOSE_FILE,
    REPO,
    cli_problems,
    dockerfile_entrypoint,
    dockerfile_instructions,
)

try:
    import kubernetes_validate
except ImportError as exc:  # a clear failure, never a skip: CI must run these checks
    raise RuntimeError("kubernetes-validate is missing: `make deploy-env` installs it") from exc

KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes release still maintained upstream when this was pinned; the manifests use
# nothing newer (the kubelet's gRPC probe is GA since 1.27).
KUBERNETES_VERSION = "1.32.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
GPU = "nvidia.com/gpu"


def kustomization() -> dict:
    return yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())


def generated_secrets(kust: dict) -> list[dict]:
    """The Secrets kustomize's secretGenerator makes (`key=path` file sources), with empty values."""
    secrets = []
    for generator in kust.get("secretGenerator", []):
        keys = [
            source.split("=", 1)[0] if "=" in source else Path(source).name for source in generator["files"]
        ]
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": generator["name"]},
                "type": generator.get("type", "Opaque"),
                "data": {key: base64.b64encode(b"").decode() for key in keys},
            }
        )
    return secrets


def resources(kust: dict | None = None) -> list[dict]:
    """Every object `kubectl apply -k deploy/kubernetes` creates, generated Secrets included."""
    kust = kustomization() if kust is None else kust
    objects = []
    for name in kust["resources"]:
        objects += [doc for doc in yaml.safe_load_all((KUBERNETES_DIR / name).read_text()) if doc]
    return objects + generated_secrets(kust)


def named(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def containers(objects: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            yield name, spec, container


def image_dockerfiles() -> dict[str, Path]:
    """Image name -> the Dockerfile that builds it, as docker-compose.yml pairs them."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return {
        service["image"].split(":", 1)[0]: REPO / service["build"]["dockerfile"]
        for service in compose["services"].values()
        if "build" in service and isinstance(service["build"], dict) and "dockerfile" in service["build"]
    }


def environment(container: dict, objects: list[dict]) -> dict[str, str]:
    """The container's variables: its own and those its envFrom ConfigMaps give."""
    config_maps = named(objects, "ConfigMap")
    env = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    env.update({item["name"]: item.get("value", "") for item in container.get("env", [])})
    return env


def parsed(argv: list[str]):
    ours, _ = split_passthrough(argv)
    return build_parser().parse_args(ours)


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


# ---------------------------------------------------------------------------- schema validation


def test_every_manifest_file_is_a_resource_of_the_kustomization():
    listed = set(kustomization()["resources"])
    on_disk = {path.name for path in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("obj", resources(), ids=lambda obj: f"{obj['kind']}/{obj['metadata']['name']}")
def test_every_manifest_is_valid_for_the_pinned_kubernetes(obj):
    # strict: a misspelt field is an error, not silently dropped by the API server.
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_broken_manifests():
    """The check above really checks: a misspelt field and a wrong type both fail."""
    deployment = named(resources(), "Deployment")["hidden-states"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 8000
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_validation_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for obj in resources():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------- the pieces fit


def test_each_container_runs_a_command_and_variables_the_cli_has():
    objects = resources()
    dockerfiles = image_dockerfiles()
    seen = set()
    for workload, _spec, container in containers(objects):
        image = container["image"]
        assert image in dockerfiles, (
            f"{workload}: image {image} is built by no Dockerfile in docker-compose.yml"
        )
        assert dockerfile_entrypoint(dockerfiles[image]) == ["dflash"]
        assert "command" not in container, f"{workload}: keep the image's ENTRYPOINT (dflash)"
        assert cli_problems(container["args"], environment(container, objects)) == [], workload
        seen.add(container["args"][0])
    assert seen == {"serve-hidden-states", "trainer-agent", "control-plane"}


def test_the_cli_check_catches_what_a_manifest_could_get_wrong():
    objects = resources()
    (container,) = named(objects, "Deployment")["hidden-states"]["spec"]["template"]["spec"]["containers"]
    args, env = container["args"], environment(container, objects)
    assert cli_problems(args, env) == []
    assert cli_problems([*args[:1], "--backend=sglang", *args[1:]], env)
    assert cli_problems(args, {**env, "DFLASH_MODLE": "Qwen/Qwen3-8B"})


def ports_opened(argv: list[str]) -> set[int]:
    """The TCP ports `dflash ARGV` listens on (given explicitly: the manifests never rely on
    defaults for a port a probe or Service names)."""
    args = parsed(argv)
    return {getattr(args, name) for name in ("port", "payload_port") if getattr(args, name, None)}


def test_probes_and_container_ports_match_the_ports_the_commands_open():
    for workload, _spec, container in containers(resources()):
        opened = ports_opened(container["args"])
        declared = {p["containerPort"] for p in container.get("ports", [])}
        assert declared == opened, workload
        main_port = parsed(container["args"]).port if opened else None
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            if "grpc" in probe or "httpGet" in probe:
                where = probe.get("grpc") or probe["httpGet"]
                assert container_port(container, where["port"]) == main_port, f"{workload} {kind}"
                if "httpGet" in probe:
                    assert where["path"] == "/healthz", f"{workload} {kind}"
            else:
                command = probe["exec"]["command"]
                assert command[0] == "dflash" and cli_problems(command[1:]) == [], f"{workload} {kind}"
                check = parsed(command[1:])
                target = getattr(check, "address", None) or getattr(check, "url", None)
                if target is not None:
                    assert urlsplit(f"//{target.split('//')[-1]}").port == main_port, f"{workload} {kind}"
    # Each service that listens has a readiness and a liveness probe.
    for workload, _spec, container in containers(resources()):
        if container.get("ports"):
            assert "readinessProbe" in container and "livenessProbe" in container, workload


def test_secrets_claims_config_maps_and_mounts_named_by_pods_exist():
    objects = resources()
    secrets = {name: set(obj["data"]) for name, obj in named(objects, "Secret").items()}
    claims = set(named(objects, "PersistentVolumeClaim"))
    config_maps = set(named(objects, "ConfigMap"))
    claimed = set()
    for workload, spec in pod_specs(objects):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        secret_files: set[str] = set()  # paths inside the container that a Secret key projects
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, workload
            for mount in container["volumeMounts"]:
                volume = volumes[mount["name"]]  # KeyError: a mount of no volume
                if "secret" in volume:
                    name = volume["secret"]["secretName"]
                    assert name in secrets, f"{workload}: no Secret {name}"
                    for item in volume["secret"]["items"]:
                        assert item["key"] in secrets[name], f"{workload}: Secret {name} has no {item['key']}"
                        secret_files.add(f"{mount['mountPath']}/{item['path']}")
            # Every path the command or a variable names under a secret mount is projected there.
            mounts = [m["mountPath"] for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
            named_paths = [a.split("=", 1)[-1] for a in container["args"]]
            named_paths += [item.get("value", "") for item in container.get("env", [])]
            for path in named_paths:
                if any(path.startswith(f"{m}/") for m in mounts):
                    assert path in secret_files, f"{workload}: {path} is not projected from the Secret"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{workload}: no PersistentVolumeClaim {claim}"
                claimed.add(claim)
    assert claimed == claims, "a PersistentVolumeClaim no pod uses"


def test_tokens_are_files_never_values():
    objects = resources()
    for workload, _spec, container in containers(objects):
        for name, value in environment(container, objects).items():
            if "TOKEN" in name:
                assert name.endswith("_FILE") or name == "HF_TOKEN_PATH", f"{workload}: ${name} holds a token"
                assert value.startswith("/etc/dflash/secrets/"), f"{workload}: ${name}={value}"
        assert not any("secretKeyRef" in item.get("valueFrom", {}) for item in container.get("env", []))
    # The trainer agents hold the agents' token, never the admin's (as in docker-compose.yml).
    (agent,) = named(objects, "Deployment")["trainer-agent"]["spec"]["template"]["spec"]["volumes"][:1]
    assert {item["key"] for item in agent["secret"]["items"]} == {"agent_token", "service_token", "hf_token"}


def test_services_and_policies_select_pods_and_reach_their_ports():
    objects = resources()
    pods = {name: spec for name, spec in pod_specs(objects)}
    labels = {
        obj["metadata"]["name"]: obj["spec"]["template"]["metadata"]["labels"]
        for obj in objects
        if obj["kind"] in WORKLOAD_KINDS
    }

    def selected(selector: dict) -> list[str]:
        return [w for w, have in labels.items() if selector.items() <= have.items()]

    for service in named(objects, "Service").values():
        (workload,) = selected(service["spec"]["selector"])
        (container,) = pods[workload]["containers"]
        for port in service["spec"]["ports"]:
            assert container_port(container, port["targetPort"]) in ports_opened(container["args"])
    for policy in named(objects, "NetworkPolicy").values():
        (workload,) = selected(policy["spec"]["podSelector"]["matchLabels"])
        (container,) = pods[workload]["containers"]
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                assert selected(peer["podSelector"]["matchLabels"]), peer
            for port in rule["ports"]:
                assert container_port(container, port["port"]) in ports_opened(container["args"])


def test_gpus_are_requested_and_match_the_engine_parallelism():
    objects = resources()
    for workload, _spec, container in containers(objects):
        resources_ = container["resources"]
        assert "memory" in resources_["limits"], f"{workload}: no memory limit"
        gpus = resources_["limits"].get(GPU)
        assert resources_["requests"].get(GPU) == gpus, f"{workload}: GPU request and limit differ"
        if container["args"][0] == "control-plane":
            assert gpus is None
            continue
        assert gpus and gpus >= 1, workload
        if container["args"][0] == "serve-hidden-states":
            _, engine = split_passthrough(container["args"])
            sizes = dict(arg.lstrip("-").split("=", 1) for arg in engine if "=" in arg)
            parallel = int(sizes.get("tensor-parallel-size", 1)) * int(sizes.get("data-parallel-size", 1))
            assert parallel == gpus, f"{workload}: vLLM uses {parallel} GPUs, the pod asks for {gpus}"


def test_pods_run_as_the_images_non_root_user():
    dockerfiles = image_dockerfiles()
    for workload, spec, container in containers(resources()):
        (user,) = [
            ins.text
            for ins in dockerfile_instructions(dockerfiles[container["image"]])
            if ins.keyword == "USER"
        ]
        uid, gid = (int(part) for part in user.split(":"))
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] and (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid), workload
        assert pod["fsGroup"] == gid, f"{workload}: volumes would not be writable by the image's user"
        assert spec["automountServiceAccountToken"] is False, workload
        hardened = container["securityContext"]
        assert hardened["allowPrivilegeEscalation"] is False and hardened["capabilities"]["drop"] == ["ALL"]
