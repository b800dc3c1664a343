"""`dflash healthcheck`: exit 0 when a service answers its health endpoint, 1 otherwise (Docker HEALTHCHECK).

    dflash healthcheck grpc 127.0.0.1:8000                 # hidden-state service: gRPC health SERVING
    dflash healthcheck http http://127.0.0.1:8600/healthz  # control plane: HTTP 2xx
    dflash healthcheck agent --control-plane http://control-plane:8600 --name trainer

`agent` asks the control plane whether the trainer agent of that name is live (the agent serves
nothing itself; its heartbeats are its health), with the agent's own token. Its flags default to
the agent's own variables, $DFLASH_AGENT_CONTROL_PLANE, $DFLASH_AGENT_NAME (else the hostname,
the agent's default name) and $DFLASH_AGENT_TOKEN_FILE (else $DFLASH_CONTROL_PLANE_TOKEN).
One line says why a check failed; nothing is printed on success, so `docker inspect` stays short.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

DEFAULT_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="Seconds to wait for an answer."
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    grpc_check = kinds.add_parser("grpc", parents=[common], help="gRPC health (grpc.health.v1) is SERVING.")
    grpc_check.add_argument("address", help="HOST:PORT of the gRPC server.")
    grpc_check.add_argument("--service", default="", help="Service name to ask about; '' = the whole server.")
    http_check = kinds.add_parser("http", parents=[common], help="GET URL answers 2xx.")
    http_check.add_argument("url", help="e.g. http://127.0.0.1:8600/healthz")
    agent_check = kinds.add_parser(
        "agent", parents=[common], help="The control plane lists this trainer agent as live."
    )
    agent_check.add_argument(
        "--control-plane",
        default=os.environ.get("DFLASH_AGENT_CONTROL_PLANE"),
        help="The control plane's URL (default: $DFLASH_AGENT_CONTROL_PLANE).",
    )
    agent_check.add_argument(
        "--name",
        default=os.environ.get("DFLASH_AGENT_NAME") or socket.gethostname(),
        help="The agent's name (default: $DFLASH_AGENT_NAME, else the hostname).",
    )
    agent_check.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("DFLASH_AGENT_TOKEN_FILE") or None,
        help="The agent's token (default: $DFLASH_AGENT_TOKEN_FILE, else $DFLASH_CONTROL_PLANE_TOKEN).",
    )


def run(args: argparse.Namespace) -> int:
    check = {"grpc": check_grpc, "http": check_http, "agent": check_agent}[args.kind]
    problem = check(args)
    if problem is not None:
        print(f"unhealthy: {problem}", flush=True)
        return 1
    return 0


def check_grpc(args: argparse.Namespace) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.hidden_states.endpoints import open_channel

    # The environment's credentials: health needs no token, but a TLS port needs its CA.
    with open_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            return f"{args.address}: {exc.code().name} {exc.details() or ''}".strip()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def _get(url: str, timeout: float, *, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def check_http(args: argparse.Namespace) -> str | None:
    try:
        status, _ = _get(args.url, args.timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{args.url}: {getattr(exc, 'reason', exc)}"
    return None if 200 <= status < 300 else f"{args.url}: HTTP {status}"


def check_agent(args: argparse.Namespace) -> str | None:
    from services.trainer.metric_sinks.control_plane import read_token

    if not args.control_plane:
        return "no control plane URL: pass --control-plane or set $DFLASH_AGENT_CONTROL_PLANE"
    url = f"{args.control_plane.rstrip('/')}/v1/agents/{quote(args.name, safe='')}"
    try:
        token = read_token(args.token_file, flag="--token-file")
        status, body = _get(url, args.timeout, token=token)
        agent = json.loads(body) if status == 200 else None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"
    if status == 404:
        return f"agent {args.name!r} is not registered at {args.control_plane}"
    if not isinstance(agent, dict):
        return f"{url}: HTTP {status}"
    if agent.get("state") != "live":
        return f"agent {args.name!r} is {agent.get('state')} at {args.control_plane}"
    return None
