"""The hidden-state services the control plane knows about, and their health over gRPC.

Known = the endpoints given with --hidden-states-endpoints, those registered in the
--hidden-states-registry folder (services/hidden_states/registry.py), plus those named by queued
and active jobs (`hidden_states_endpoint`). Every configured or registered one is checked (the
registry is the operator's folder), and of those jobs name,
only the first --max-probed-job-endpoints (active jobs' first): anyone who may submit jobs could
otherwise make the control plane dial any number of hosts. Each is asked two things, with a
short deadline so one dead host does not slow the listing:
- `grpc.health.v1.Health/Check` for the HiddenStates service: SERVING or NOT_SERVING (a service
  that is up but still loading its verifier, or draining);
- `HiddenStates/GetInfo`: what it serves (verifier, backend, layer ids, dtype), so a user sees a
  layer-id or verifier mismatch with a job before the trainer refuses it.
Answers are cached for a couple of seconds: the dashboard and scripts poll this route.

Probes run on a small pool of their own, one at a time per endpoint however many requests ask,
and the route awaits them without holding a worker thread: the agents' heartbeats and every
other route run on the server's thread pool, which slow probes must never fill.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.control_plane.schemas import HiddenStateServicePublic, JobRecord, ServiceInfoPublic
from services.control_plane.states import ACTIVE_STATES, JobState
from services.hidden_states.endpoints import open_channel, parse_endpoint
from services.hidden_states.registry import Registered, read_registry

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
    def __init__(
        self,
        *,
        configured: Iterable[str],
        max_job_endpoints: int,
        registry: Path | None = None,
        timeout_s: float = 2.0,
        cache_s: float = 2.0,
        workers: int = 8,
    ) -> None:
        self.configured = [parse_endpoint(e) for e in configured]
        self.max_job_endpoints = max_job_endpoints
        self.registry = registry
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hidden-state-probe")
        self._cache: dict[str, Probe] = {}
        self._in_flight: dict[str, Future[Probe]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _probe_soon(self, address: str) -> Future[Probe]:
        """The cached answer when fresh, else the probe in flight for `address`, else a new one."""
        with self._lock:
            cached = self._cache.get(address)
            if cached is not None and time.time() - cached.checked_at < self.cache_s:
                done: Future[Probe] = Future()
                done.set_result(cached)
                return done
            running = self._in_flight.get(address)
            if running is None:
                running = self._in_flight[address] = self._pool.submit(self._probe, address)
            return running

    def _probe(self, address: str) -> Probe:
        try:
            fresh = probe(parse_endpoint(address), timeout_s=self.timeout_s)
        except ValueError as exc:  # a job named an endpoint that is no host:port
            fresh = Probe("error", str(exc), None, time.time())
        except Exception as exc:  # never a stuck entry in _in_flight
            fresh = Probe("error", f"the check failed: {exc}", None, time.time())
        with self._lock:
            self._cache[address] = fresh
            self._in_flight.pop(address, None)
        return fresh

    def registered(self) -> dict[str, Registered]:
        """The registry folder's services by name (read afresh: services come and go)."""
        return read_registry(self.registry) if self.registry is not None else {}

    def _known(self, jobs: Iterable[JobRecord], own: list[str]) -> tuple[dict[str, list[str]], list[str]]:
        """Every known endpoint with the jobs that name it, and those to check (the configured
        and registered ones, `own`, then the first `max_job_endpoints` the jobs name, active jobs
        first)."""
        users: dict[str, list[str]] = {address: [] for address in own}
        named: list[str] = []
        listed = [job for job in jobs if job.state in (JobState.QUEUED, *ACTIVE_STATES)]
        for job in sorted(listed, key=lambda job: job.state == JobState.QUEUED):  # stable: active first
            for address in endpoints_of(job):
                if address not in users:
                    named.append(address)
                users.setdefault(address, []).append(job.id)
        return users, [*own, *named[: self.max_job_endpoints]]

    async def list(self, jobs: Iterable[JobRecord]) -> list[HiddenStateServicePublic]:
        # Off the event loop: the registry lives on a shared file system, which may be slow.
        registered = await asyncio.to_thread(self.registered)
        names = {entry.endpoint: entry for entry in registered.values()}
        own = list(dict.fromkeys([*self.configured, *names]))
        users, checked = self._known(jobs, own)
        with self._lock:  # forget endpoints no job names any more
            for address in set(self._cache) - set(users):
                del self._cache[address]
        broken = {a for a, entry in names.items() if entry.problem is not None}
        checked = [a for a in checked if a not in broken]
        answers = await asyncio.gather(*(asyncio.wrap_future(self._probe_soon(a)) for a in checked))
        probes = dict(zip(checked, answers, strict=True))
        for address in broken:
            probes[address] = Probe("error", names[address].problem, None, time.time())
        skipped = Probe(
            "error",
            f"not checked: jobs name more than {self.max_job_endpoints} hidden-state services, and only "
            "the first of them (and every --hidden-states-endpoints one) are (--max-probed-job-endpoints)",
            None,
            time.time(),
        )
        listing = []
        for address, job_ids in users.items():
            found = probes.get(address, skipped)
            listing.append(
                HiddenStateServicePublic(
                    endpoint=address,
                    configured=address in self.configured,
                    registered_as=names[address].name if address in names else None,
                    jobs=job_ids,
                    status=found.status,
                    detail=found.detail,
                    info=found.info,
                    checked_at=found.checked_at,
                )
            )
        return listing
