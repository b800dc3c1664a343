"""The Extract streams under `GrpcSource`: one thread per stream, reconnecting until told to stop.

A stream knows nothing of queues or byte budgets: it asks its owner (`StreamOwner`, the source)
for the next request, hands every answer, per-sample error and lost call back to it, and keeps
its endpoint's circuit breaker and payload-channel counters. When the service offers a payload
port, a call's samples may also arrive on a TCP side channel, read by a `PayloadReader` beside
the gRPC stream (dflash_core/wire/payload_channel.py).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import grpc

from dflash_core.wire import payload_channel
from dflash_core.wire.codec import DecodedSample, FrameAssembler, SampleBuffers, WireError, parse_frame
from dflash_core.wire.identity import EXPECT_VERIFIER_KEY
from dflash_core.wire.payload_channel import (
    PAYLOAD_PORT_KEY,
    PAYLOAD_TOKEN_KEY,
    PayloadChannelError,
    RecordReader,
    new_token,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb
from services.hidden_states.service_set import HiddenStateServiceError, ServiceEndpoint, ServiceSet
from services.trainer.endpoint_health import CircuitBreaker

logger = logging.getLogger(__name__)

# Transient: the service restarts, the network blips, the service is saturated.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
EXTRACT_METHOD = f"/{pb.DESCRIPTOR.services_by_name['HiddenStates'].full_name}/Extract"
# Connecting to the payload port and getting the token acknowledged: loopback or a LAN takes
# milliseconds; past this the call goes on in-band rather than wait.
PAYLOAD_CONNECT_TIMEOUT_S = 5.0
# After a call ends cleanly the service has already written RECORD_END; reading up to it is quick.
PAYLOAD_DRAIN_TIMEOUT_S = 5.0
PayloadTransport = Literal["auto", "grpc"]


@dataclass(eq=False)
class ExtractCall:
    """One Extract call: what was sent on it and not answered yet. Dead calls hand those back."""

    endpoint: StreamEndpoint
    assigned: set[int] = field(default_factory=set)
    alive: bool = True


@dataclass(eq=False)
class StreamEndpoint:
    """An endpoint as its streams see it: the service endpoint, its health and what it delivered."""

    service: ServiceEndpoint
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    delivered: int = 0
    delivered_on_payload_channel: int = 0  # of `delivered`: samples that came off gRPC
    payload_connections: int = 0  # calls whose payload connection was bound
    payload_fallback: str | None = None  # why the last call went in-band (warned once per reason)
    # The endpoint's streams fall back concurrently: the check-and-set of `payload_fallback` is
    # under this lock, or two streams meeting the same refusal would both warn.
    fallback_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def address(self) -> str:
        return self.service.address


@dataclass(frozen=True)
class StreamSettings:
    """What every stream of one source sends and reads with; fixed for the source's life."""

    layer_ids: list[int]  # asked for on every request; a late endpoint must serve them all
    expected_json: str  # the verifier fingerprint the service must run (call metadata)
    payload_transport: PayloadTransport
    buffers: SampleBuffers  # where received samples are assembled
    bytes_per_token: int  # of one sample's answer: bounds what a payload record may announce


class StreamOwner(Protocol):
    """What a stream needs from the source that owns it; every method is thread-safe."""

    @property
    def closing(self) -> bool:
        """The source is closing: streams end, and errors on the way out are not reported."""

    @property
    def stopped(self) -> bool:
        """Closing, or failed for good: no new call starts."""

    def next_request(self, call: ExtractCall) -> pb.ExtractRequest | None:
        """Block until a request may go on `call`; None ends the call."""

    def deliver(self, call: ExtractCall, decoded: DecodedSample, *, on_payload_channel: bool) -> None:
        """A sample arrived on `call` (checked and kept by the owner, or dropped if it moved on)."""

    def reject(self, call: ExtractCall, sample_id: int, code: grpc.StatusCode, message: str) -> None:
        """The service reported an error for one sample of `call`."""

    def give_back(self, call: ExtractCall) -> None:
        """`call` ended: what it has not answered goes back to the queue."""

    def fail(self, error: HiddenStateServiceError) -> None:
        """A failure no retry fixes: the owner stops and raises it to the trainer."""


class ExtractStream(threading.Thread):
    """One Extract call at a time to one endpoint, reconnecting until the owner stops."""

    def __init__(
        self,
        owner: StreamOwner,
        endpoint: StreamEndpoint,
        *,
        index: int,
        settings: StreamSettings,
        services: ServiceSet,
    ) -> None:
        super().__init__(name=f"hidden-states-{endpoint.address}-{index}", daemon=True)
        self.owner, self.endpoint, self.settings, self.services = owner, endpoint, settings, services
        self._rpc: grpc.Future | None = None
        # Extract by hand: `parse_frame` leaves each payload a view of the received bytes (the
        # generated stub would copy it into a message first), so frames land with one copy.
        self._extract = endpoint.service.channel.stream_stream(
            EXTRACT_METHOD,
            request_serializer=pb.ExtractRequest.SerializeToString,
            response_deserializer=parse_frame,
        )

    def cancel(self) -> None:
        rpc = self._rpc
        if rpc is not None:
            rpc.cancel()

    def run(self) -> None:
        owner, endpoint, breaker = self.owner, self.endpoint, self.endpoint.breaker
        while not owner.stopped:
            resume_at = time.monotonic() + breaker.wait_before_attempt()
            while time.monotonic() < resume_at and not owner.closing:
                time.sleep(min(resume_at - time.monotonic(), 0.2))  # short naps so close() is prompt
            if owner.closing:
                return
            call = ExtractCall(endpoint=endpoint)
            try:
                if endpoint.service.info is None:
                    # Down at start: it must serve the same verifier and layers as the others.
                    self.services.admit(endpoint.service, layer_ids=self.settings.layer_ids)
                self._run_call(call)
            except HiddenStateServiceError as exc:
                owner.fail(exc)
                return
            except grpc.RpcError as exc:
                if owner.closing:
                    return
                code, message = exc.code(), f"{exc.code().name}: {exc.details()}"
                if code not in RETRYABLE:
                    # FAILED_PRECONDITION (another verifier), UNIMPLEMENTED, ...: no retry fixes it.
                    owner.fail(HiddenStateServiceError(f"{endpoint.address}: {exc.details()} ({code.name})"))
                    return
                breaker.record_failure(message)
                logger.warning("%s: %s (%s)", endpoint.address, message, breaker.describe())
            except WireError as exc:
                breaker.record_failure(f"malformed response: {exc}")
                logger.error("%s: malformed response: %s", endpoint.address, exc)
            except PayloadChannelError as exc:
                if owner.closing:
                    return
                breaker.record_failure(f"payload connection: {exc}")
                logger.warning(
                    "%s: payload connection failed: %s (%s)", endpoint.address, exc, breaker.describe()
                )
            finally:
                self._rpc = None
                owner.give_back(call)

    def _run_call(self, call: ExtractCall) -> None:
        info = self.endpoint.service.info
        offer = self.settings.payload_transport == "auto" and info is not None and info.payload_port != 0
        token = new_token() if offer else None
        metadata = [(EXPECT_VERIFIER_KEY, self.settings.expected_json)]
        if token is not None:
            metadata.append((PAYLOAD_TOKEN_KEY, token.hex()))
        rpc = self._extract(self._requests(call), metadata=tuple(metadata))
        self._rpc = rpc
        sock = self._open_payload_channel(rpc, token) if token is not None else None
        if sock is None:
            self._read_responses(call, rpc)
            return
        assert info is not None  # a token is only offered to an endpoint that answered GetInfo
        reader = PayloadReader(
            self.owner,
            call,
            sock=sock,
            rpc=rpc,
            buffers=self.settings.buffers,
            # No request may get more: a larger announcement is a broken stream, not a sample.
            max_sample_bytes=max(info.max_length, 1) * self.settings.bytes_per_token,
            name=f"{self.name}-payload",
        )
        reader.start()
        clean = False
        try:
            self._read_responses(call, rpc)  # errors, the end, and samples sent before the binding
            clean = True
        except grpc.RpcError:
            if reader.failure is not None:
                raise reader.failure from None  # the connection broke first and cancelled the call
            raise
        finally:
            reader.stop(drain_s=PAYLOAD_DRAIN_TIMEOUT_S if clean else 0.0)
        if reader.failure is not None:
            raise reader.failure

    def _open_payload_channel(self, rpc: grpc.Future, token: bytes) -> socket.socket | None:
        """The call's payload connection, or None: the call goes on in-band."""
        # The service answers a token at once with its initial metadata (servicer.py).
        metadata = dict(rpc.initial_metadata() or ())
        port = metadata.get(PAYLOAD_PORT_KEY)
        if port is None:
            if not rpc.done():  # a call that failed says why in the response loop
                self._fall_back("the service offered no payload port for this call")
            return None
        host = self.endpoint.address.rpartition(":")[0].strip("[]")  # the host we dialled for gRPC
        try:
            sock = payload_channel.connect(host, int(port), token, timeout_s=PAYLOAD_CONNECT_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            self._fall_back(f"payload port {host}:{port}: {exc or type(exc).__name__}")
            return None
        with self.endpoint.fallback_lock:
            self.endpoint.payload_fallback = None
            self.endpoint.payload_connections += 1
        return sock

    def _fall_back(self, reason: str) -> None:
        with self.endpoint.fallback_lock:
            if self.endpoint.payload_fallback == reason:
                return
            self.endpoint.payload_fallback = reason
        logger.warning(
            "%s: frames travel in-band on gRPC, not on the payload side channel: %s",
            self.endpoint.address,
            reason,
        )

    def _read_responses(self, call: ExtractCall, rpc: grpc.Future) -> None:
        assembler = FrameAssembler(self.settings.buffers)
        for response in rpc:
            if response.HasField("error"):
                code = _CODE_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
                self.owner.reject(call, response.sample_id, code, response.error.message)
                continue
            decoded = assembler.add(response)
            if decoded is not None:
                self.owner.deliver(call, decoded, on_payload_channel=False)
                self.endpoint.breaker.record_success()

    def _requests(self, call: ExtractCall) -> Iterator[pb.ExtractRequest]:
        while True:
            request = self.owner.next_request(call)
            if request is None:
                return
            yield request


class PayloadReader(threading.Thread):
    """Reads one call's payload connection and delivers its samples, until `stop` or a failure.

    A failure (the connection closes without RECORD_END, or a malformed record) is kept in
    `failure` and cancels the call, so the stream's usual path gives the call's unanswered
    samples back and reconnects.
    """

    def __init__(
        self,
        owner: StreamOwner,
        call: ExtractCall,
        *,
        sock: socket.socket,
        rpc: grpc.Future,
        buffers: SampleBuffers,
        max_sample_bytes: int,
        name: str,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.owner, self.call, self.sock, self.rpc = owner, call, sock, rpc
        self.records = RecordReader(sock, buffers=buffers, max_sample_bytes=max_sample_bytes)
        self.failure: PayloadChannelError | WireError | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        endpoint = self.call.endpoint
        try:
            while (decoded := self.records.read()) is not None:
                self.owner.deliver(self.call, decoded, on_payload_channel=True)
                endpoint.breaker.record_success()
        except Exception as exc:
            if self._stopping.is_set():
                return  # `stop` closed the connection under the read
            if isinstance(exc, PayloadChannelError | WireError):
                self.failure = exc
            else:
                if not isinstance(exc, OSError):
                    logger.exception("%s: payload reader failed", endpoint.address)
                self.failure = PayloadChannelError(f"the payload connection broke: {exc}")
            self.rpc.cancel()

    def stop(self, *, drain_s: float) -> None:
        """Wait up to `drain_s` for RECORD_END, then close the connection and join."""
        if drain_s > 0:
            self.join(drain_s)
        self._stopping.set()
        payload_channel.close(self.sock)
        self.join()
