"""The hidden-state services the control plane knows about, and their health over gRPC.

Known = the endpoints given with --hidden-states-endpoints, plus those named by queued and
active jobs (`hidden_states_endpoint`). Each is asked two things, concurrently and with a short
deadline so one dead host does not slow the listing:
- `grpc.health.v1.Health/Check` for the HiddenStates service: SERVING or NOT_SERVING (a service
  that is up but still loading its verifier, or draining);
- `HiddenStates/GetInfo`: what it serves (verifier, backend, layer ids, dtype), so a user sees a
  layer-id or verifier mismatch with a job before the trainer refuses it.
Answers are cached for a couple of seconds: the dashboard and scripts poll this route.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.control_plane.schemas import HiddenStateServicePublic, JobRecord, ServiceInfoPublic
from services.control_plane.states import ACTIVE_STATES, JobState
from services.hidden_states.endpoints import open_channel, parse_endpoint

HIDDEN_STATES_SERVICE = pb.DESCRIPTOR.services_by_name["HiddenStates"].full_name


@dataclass(frozen=True)
class Probe:
    status: str  # serving | not_serving | unreachable | error
    detail: str | None
    info: ServiceInfoPublic | None
    checked_at: float


def probe(address: str, *, timeout_s: float) -> Probe:
    """Health and info of the service at `address` (host:port)."""
    channel = open_channel(address)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return Probe("unreachable", f"no gRPC connection within {timeout_s:g} s", None, time.time())
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=HIDDEN_STATES_SERVICE), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return Probe(
                "error", f"health check failed: {exc.code().name}: {exc.details()}", None, time.time()
            )
        serving = answer.status == health_pb2.HealthCheckResponse.SERVING
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        try:
            info = pb_grpc.HiddenStatesStub(channel).GetInfo(pb.GetInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            detail = f"health {status_name}; GetInfo failed: {exc.code().name}: {exc.details()}"
            return Probe("serving" if serving else "not_serving", detail, None, time.time())
        return Probe(
            "serving" if serving else "not_serving",
            None if serving else f"health {status_name}",
            ServiceInfoPublic(
                verifier=info.verifier_name_or_path,
                backend=info.backend,
                architecture=info.architecture,
                num_layers=info.num_layers,
                hidden_size=info.hidden_size,
                layer_ids=list(info.layer_ids),
                dtype=info.dtype,
                max_length=info.max_length,
                server_version=info.server_version,
            ),
            time.time(),
        )
    finally:
        channel.close()


def normalized(endpoint: str) -> str:
    """host:port for a usable endpoint; the text as given for one that is not (listed as `error`
    with the reason, rather than failing the whole listing)."""
    try:
        return parse_endpoint(endpoint)
    except ValueError:
        return endpoint


def endpoints_of(job: JobRecord) -> list[str]:
    return [normalized(e) for e in job.config.get("hidden_states_endpoint") or []]


class HiddenStateServices:
    def __init__(self, *, configured: Iterable[str], timeout_s: float = 2.0, cache_s: float = 2.0) -> None:
        self.configured = [parse_endpoint(e) for e in configured]
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._cache: dict[str, Probe] = {}
        self._lock = threading.Lock()

    def _probe_cached(self, address: str) -> Probe:
        with self._lock:
            cached = self._cache.get(address)
        if cached is not None and time.time() - cached.checked_at < self.cache_s:
            return cached
        try:
            fresh = probe(parse_endpoint(address), timeout_s=self.timeout_s)
        except ValueError as exc:  # a job named an endpoint that is no host:port
            fresh = Probe("error", str(exc), None, time.time())
        with self._lock:
            self._cache[address] = fresh
        return fresh

    def list(self, jobs: Iterable[JobRecord]) -> list[HiddenStateServicePublic]:
        users: dict[str, list[str]] = {address: [] for address in self.configured}
        for job in jobs:
            if job.state in (JobState.QUEUED, *ACTIVE_STATES):
                for address in endpoints_of(job):
                    users.setdefault(address, []).append(job.id)
        if not users:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(users))) as pool:
            probes = dict(zip(users, pool.map(self._probe_cached, users), strict=True))
        return [
            HiddenStateServicePublic(
                endpoint=address,
                configured=address in self.configured,
                jobs=job_ids,
                status=probes[address].status,
                detail=probes[address].detail,
                info=probes[address].info,
                checked_at=probes[address].checked_at,
            )
            for address, job_ids in users.items()
        ]
