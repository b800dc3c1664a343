"""Build, start and stop the gRPC server around a backend: the service itself, health, reflection.

    server = HiddenStateServer(backend, config).start()
    print(server.address)          # "127.0.0.1:8000"
    server.wait()                  # until stop() or a signal

Health reports SERVING for "" and "dflash.v1.HiddenStates" once the backend is loaded, and
NOT_SERVING while the server drains on shutdown, so load balancers stop sending first. With a
token (`ServiceAccess`) every other method refuses calls without it; reflection is served only when
asked for; under TLS the payload side channel is off.

Beside the gRPC port the server listens on a payload port (`payload_port`: None = a free port
picked now, 0 = none) on the same host: trainers move hidden-state bytes over it off gRPC
(`payload_listener.py`, the wire's frames without gRPC's copies; docs/benchmarks.md, Transport).
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dflash_core.wire.pb import hidden_states_pb2 as pb
from services.hidden_states.backends.base import Backend
from services.hidden_states.credentials import TokenInterceptor
from services.hidden_states.endpoints import CHANNEL_OPTIONS
from services.hidden_states.payload_listener import PayloadListener
from services.hidden_states.scheduler import Scheduler
from services.hidden_states.servicer import (
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    GenerateLimits,
    HiddenStatesServicer,
    max_request_bytes,
    register,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HiddenStates"].full_name


@dataclass(frozen=True)
class ServiceAccess:
    """Who may call (services/hidden_states/credentials.py): no token and no TLS = anyone who reaches it."""

    token: str | None = None
    tls: grpc.ServerCredentials | None = None
    reflection: bool = False


class HiddenStateServer:
    def __init__(
        self,
        backend: Backend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_bytes: int = 8 << 20,
        max_streams: int = 64,
        max_pending_per_stream: int = 64,
        payload_port: int | None = None,
        access: ServiceAccess | None = None,
        generate_limits: GenerateLimits | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        access = access or ServiceAccess()
        if access.tls is not None and payload_port != 0:
            # The side channel is plain TCP: under TLS every frame stays on the encrypted gRPC stream.
            logger.info("TLS is on: the payload side channel is off, hidden states travel on gRPC")
            payload_port = 0
        self.backend = backend
        self.scheduler = Scheduler(backend)
        # Every live Extract stream holds a pool thread for its responses; the spare threads keep
        # GetInfo, Generate and health answering while all streams are busy.
        spare = 8
        generate_limits = generate_limits or GenerateLimits()
        # Requests carry token ids only: a message bigger than the largest valid one is refused by
        # gRPC before it is parsed (a huge request would otherwise grow the process many times over).
        receive = ("grpc.max_receive_message_length", max_request_bytes(backend.info, generate_limits))
        options = [o for o in CHANNEL_OPTIONS if o[0] != receive[0]]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_streams + spare, thread_name_prefix="grpc"),
            options=[*options, receive, ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=max_streams + spare,
            interceptors=[TokenInterceptor(access.token)] if access.token is not None else None,
        )
        self.payload_listener = (
            PayloadListener(host, payload_port or 0) if payload_port != 0 else None
        )  # bound now, so a port in use fails here, like the gRPC port
        self.servicer = HiddenStatesServicer(
            self.scheduler,
            max_frame_bytes=max_frame_bytes,
            max_pending_per_stream=max_pending_per_stream,
            max_streams=max_streams,
            payload_listener=self.payload_listener,
            generate_limits=generate_limits,
            max_pending_bytes=max_pending_bytes,
            stall_timeout_s=stall_timeout_s,
        )
        register(self.servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if access.reflection:
            reflection.enable_server_reflection(
                [
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                self._server,
            )
        if access.tls is not None:
            bound = self._server.add_secure_port(f"{host}:{port}", access.tls)
        else:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            if self.payload_listener is not None:
                self.payload_listener.stop()
            raise OSError(f"cannot bind the hidden-state service to {host}:{port} (in use?)")
        self.host, self.port = host, bound

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def payload_port(self) -> int:
        """The side channel's port on `host`; 0 when it is off."""
        return self.payload_listener.port if self.payload_listener is not None else 0

    def start(self) -> HiddenStateServer:
        self.scheduler.start()
        if self.payload_listener is not None:
            self.payload_listener.start()
        self._server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        info = self.backend.info
        logger.info(
            "hidden-state service (%s backend, %s, layer ids %s) listening on %s, payload port %s",
            info.name,
            info.fingerprint.name_or_path,
            list(info.layer_ids),
            self.address,
            self.payload_port or "off",
        )
        return self

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace: float = 5.0) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.servicer.close()
        if self.payload_listener is not None:
            self.payload_listener.stop()
        self.scheduler.stop()
        self.backend.close()
