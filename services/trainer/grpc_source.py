"""The trainer's side of the hidden-state service: a `HiddenStateSource` over gRPC streams.

    source = GrpcSource(["10.0.0.5:8000", "10.0.0.6:8000"], target_layer_ids=[2, 18, 33],
                        expected=fingerprint, inflight_bytes=1 << 30)
    source.prefetch(next_steps_requests)   # starts them moving; returns at once
    states = source.extract(this_step_requests)

How samples move:
- Requests wait in one queue (`extract`'s go first, then prefetched ones in order). Every endpoint
  runs `streams_per_endpoint` Extract streams; each stream pulls the next request whenever the
  bytes requested but not yet consumed stay under `inflight_bytes`. Faster endpoints pull more,
  so load spreads by itself.
- Every response is checked: the token digest it echoes, its shape, layer ids and dtype, and that
  it is finite and not all zero. A result is kept only while its request is still assigned to the
  stream that delivered it, so each sample reaches the trainer exactly once.
- A stream that breaks gives its unfinished requests back to the queue (others, or the same
  endpoint once it is back, pick them up) and reconnects after a backoff; an endpoint that keeps
  failing is left alone by its circuit breaker for a while. When nothing at all arrives for
  `timeout_s`, `extract` raises naming every endpoint's last error.
- A service running another verifier (FAILED_PRECONDITION) or rejecting a sample
  (INVALID_ARGUMENT) is not retried: that is a configuration error and `extract` raises it.

The payload side channel (`payload_transport="auto"`, the default): when the service advertises a
payload port, every Extract call offers a fresh random token in its metadata, and once the
service answers with the port, opens one TCP connection to it on the host of the gRPC endpoint
and presents the token (dflash_core/wire/payload_channel.py). The call's samples then arrive on
that connection, `recv_into` the trainer's sample memory with no other copy (1.5-2x the bytes/s
of in-band frames, docs/benchmarks.md); errors and the end of the call stay on the gRPC
stream, and samples may arrive on either. When the connection cannot be opened or the handshake
fails, the call carries on in-band (one warning names the endpoint and the reason); a connection
that breaks fails the call like any other stream failure: unanswered samples go back to the
queue, the stream reconnects with backoff. Checks and the exactly-once rule are the same on both
paths. `payload_transport="grpc"` never offers a token (to compare, or through proxies that pass
gRPC only).
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc

from dflash_core.verifier import VerifierFingerprint
from dflash_core.wire import payload_channel
from dflash_core.wire.codec import (
    WIRE_DTYPES,
    DecodedSample,
    FrameAssembler,
    SampleBuffers,
    WireError,
    check_finite_nonzero,
    parse_frame,
    token_ids_digest,
)
from dflash_core.wire.identity import EXPECT_VERIFIER_KEY, fingerprint_from_info
from dflash_core.wire.payload_channel import (
    PAYLOAD_PORT_KEY,
    PAYLOAD_TOKEN_KEY,
    PayloadChannelError,
    RecordReader,
    new_token,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel, parse_endpoint
from services.trainer.endpoint_health import CircuitBreaker
from services.trainer.sources import SampleHiddenStates, SampleRequest

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
# A sample the service fails on this many times is an error, not bad luck.
MAX_SAMPLE_FAILURES = 3
# Once one endpoint answered at start-up, how long to wait for the others before going ahead.
OTHER_ENDPOINTS_GRACE_S = 10.0
# Connecting to the payload port and getting the token acknowledged: loopback or a LAN takes
# milliseconds; past this the call goes on in-band rather than wait.
PAYLOAD_CONNECT_TIMEOUT_S = 5.0
# After a call ends cleanly the service has already written RECORD_END; reading up to it is quick.
PAYLOAD_DRAIN_TIMEOUT_S = 5.0
PayloadTransport = Literal["auto", "grpc"]


class HiddenStateServiceError(RuntimeError):
    """The service cannot deliver: a configuration mismatch, a rejected sample, or nobody answers."""


@dataclass
class _Pending:
    request: SampleRequest
    digest: bytes
    num_bytes: int  # what the answer will occupy: counted against inflight_bytes once sent
    urgent: bool = False  # asked for by `extract`: sent even over the byte budget
    call: _Call | None = None  # the call it was sent on; None while queued
    failures: int = 0  # per-sample errors the service reported (INTERNAL, ...)
    result: SampleHiddenStates | None = None
    error: HiddenStateServiceError | None = None


@dataclass(eq=False)
class _Call:
    """One Extract call: what was sent on it and not answered yet. Dead calls hand those back."""

    stream: _Stream
    assigned: set[int] = field(default_factory=set)
    alive: bool = True


@dataclass
class _Endpoint:
    address: str
    channel: grpc.Channel
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    info: pb.ServiceInfo | None = None
    delivered: int = 0
    delivered_on_payload_channel: int = 0  # of `delivered`: samples that came off gRPC
    payload_connections: int = 0  # calls whose payload connection was bound
    payload_fallback: str | None = None  # why the last call went in-band (warned once per reason)
    # The endpoint's streams fall back concurrently: the check-and-set of `payload_fallback` is
    # under this lock, or two streams meeting the same refusal would both warn.
    fallback_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def query_service_info(endpoints: Sequence[str], *, timeout_s: float = 60.0) -> pb.ServiceInfo:
    """GetInfo of the first endpoint that answers (to learn what a service serves before using it)."""
    deadline = time.monotonic() + timeout_s
    errors: dict[str, str] = {}
    while True:
        for endpoint in endpoints:
            address = parse_endpoint(endpoint)
            with open_channel(address) as channel:
                try:
                    return pb_grpc.HiddenStatesStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5.0)
                except grpc.RpcError as exc:
                    errors[address] = f"{exc.code().name}: {exc.details()}"
        if time.monotonic() >= deadline:
            raise HiddenStateServiceError(
                f"no hidden-state service answered within {timeout_s:.0f} s: "
                + "; ".join(f"{a}: {m}" for a, m in errors.items())
            )
        time.sleep(0.5)


class GrpcSource:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        target_layer_ids: Sequence[int],
        expected: VerifierFingerprint | None = None,
        inflight_bytes: int = 1 << 30,
        streams_per_endpoint: int = 2,
        timeout_s: float = 300.0,
        connect_timeout_s: float | None = None,
        payload_transport: PayloadTransport = "auto",
    ) -> None:
        if not endpoints:
            raise ValueError("GrpcSource needs at least one endpoint")
        if payload_transport not in ("auto", "grpc"):
            raise ValueError(f"payload_transport must be 'auto' or 'grpc', got {payload_transport!r}")
        self.payload_transport = payload_transport
        self._target_layer_ids = [int(i) for i in target_layer_ids]
        self.inflight_bytes = inflight_bytes
        self.timeout_s = timeout_s
        self._endpoints = [
            _Endpoint(address=parse_endpoint(e), channel=open_channel(parse_endpoint(e))) for e in endpoints
        ]
        info = self._first_info(connect_timeout_s if connect_timeout_s is not None else timeout_s)
        self._fingerprint = fingerprint_from_info(info)
        if expected is not None:
            self._check_expected(expected, info)
        self._expected_json = json.dumps((expected or self._fingerprint).model_dump())
        self._check_layers(info)
        self._dtype = WIRE_DTYPES.get(info.dtype)
        if self._dtype is None:
            raise HiddenStateServiceError(
                f"the service sends dtype {info.dtype!r}, which this trainer cannot read"
            )
        # Layer N rides along for the training targets; asked for once when it is an aux id too
        # (the service refuses a repeated id).
        num_layers = self._fingerprint.num_layers
        self._layer_ids = [
            *self._target_layer_ids,
            *([] if num_layers in self._target_layer_ids else [num_layers]),
        ]
        self._last_index = self._layer_ids.index(num_layers)
        self._bytes_per_token = len(self._layer_ids) * self._fingerprint.hidden_size * self._dtype.itemsize

        # Reused sample memory (no page faults per sample). The trainer holds consumed samples
        # for a step beside those in flight, hence twice the budget.
        self._buffers = SampleBuffers(2 * inflight_bytes)
        self._cond = threading.Condition()
        self._queue: collections.deque[int] = collections.deque()
        self._pending: dict[int, _Pending] = {}
        self._bytes_sent = 0  # of samples sent and not yet consumed: what inflight_bytes bounds
        self._last_progress = time.monotonic()
        self._fatal: HiddenStateServiceError | None = None
        self._closing = False
        self._streams = [
            _Stream(self, endpoint, index)
            for endpoint in self._endpoints
            for index in range(streams_per_endpoint)
        ]
        for stream in self._streams:
            stream.start()

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> VerifierFingerprint:
        return self._fingerprint

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self._target_layer_ids)

    @property
    def service_info(self) -> pb.ServiceInfo:
        info = next((e.info for e in self._endpoints if e.info is not None), None)
        assert info is not None  # the constructor got one
        return info

    def _first_info(self, timeout_s: float) -> pb.ServiceInfo:
        """GetInfo from every endpoint that answers within `timeout_s` (at least one must)."""
        deadline = time.monotonic() + timeout_s
        errors: dict[str, str] = {}
        first_answer: float | None = None
        while True:
            for endpoint in self._endpoints:
                if endpoint.info is not None:
                    continue
                try:
                    endpoint.info = pb_grpc.HiddenStatesStub(endpoint.channel).GetInfo(
                        pb.GetInfoRequest(), timeout=min(5.0, max(deadline - time.monotonic(), 0.1))
                    )
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        # A missing or wrong token: waiting does not fix it.
                        raise HiddenStateServiceError(
                            f"{endpoint.address}: {exc.details()} ({exc.code().name})"
                        ) from None
                    errors[endpoint.address] = f"{exc.code().name}: {exc.details()}"
            infos = [e for e in self._endpoints if e.info is not None]
            now = time.monotonic()
            if infos and first_answer is None:
                first_answer = now
            if len(infos) == len(self._endpoints):
                break
            if first_answer is not None and now - first_answer >= OTHER_ENDPOINTS_GRACE_S:
                break  # the rest join when they come up (their streams keep trying)
            if now >= deadline:
                if infos:
                    break
                raise HiddenStateServiceError(
                    f"no hidden-state service answered within {timeout_s:.0f} s: "
                    + "; ".join(f"{a}: {m}" for a, m in errors.items())
                    + ". Start one with `dflash serve-hidden-states MODEL --target-layer-ids ...`"
                )
            time.sleep(0.5)
        first = infos[0]
        for other in infos[1:]:
            problems = fingerprint_from_info(first.info).mismatches(  # type: ignore[arg-type]
                fingerprint_from_info(other.info),  # type: ignore[arg-type]
                this_side=first.address,
                other_side=other.address,
            )
            if problems:
                raise HiddenStateServiceError(
                    "the hidden-state endpoints serve different verifiers:\n  " + "\n  ".join(problems)
                )
        for endpoint in self._endpoints:
            if endpoint.info is None:
                logger.warning(
                    "hidden-state endpoint %s is not answering yet (%s)",
                    endpoint.address,
                    errors.get(endpoint.address),
                )
        return first.info  # type: ignore[return-value]

    def _check_expected(self, expected: VerifierFingerprint, info: pb.ServiceInfo) -> None:
        problems = expected.mismatches(fingerprint_from_info(info), this_side="trainer", other_side="service")
        if problems:
            raise HiddenStateServiceError(
                "the hidden-state service runs another verifier than this training run:\n  "
                + "\n  ".join(problems)
                + "\nrestart the service with the trainer's verifier (or train against the service's)"
            )

    def _check_layers(self, info: pb.ServiceInfo) -> None:
        served = list(info.layer_ids)
        missing = [i for i in self._target_layer_ids if i not in served]
        if missing:
            raise HiddenStateServiceError(
                f"--target-layer-ids {self._target_layer_ids}: the service does not serve {missing}; "
                f"it serves {served}. Restart it with `dflash serve-hidden-states ... --target-layer-ids "
                f"{' '.join(map(str, self._target_layer_ids))}` (both sides must agree, or the drafter "
                "trains on the wrong layers and accepts ~1 token)"
            )

    # ------------------------------------------------------------------ the trainer's calls
    def prefetch(self, requests: Sequence[SampleRequest]) -> None:
        """Start moving these samples (in order, behind anything already queued)."""
        with self._cond:
            self._enqueue(requests, front=False)

    def extract(self, requests: Sequence[SampleRequest]) -> list[SampleHiddenStates]:
        """Hidden states for each request, in request order; raises `HiddenStateServiceError`."""
        with self._cond:
            self._enqueue(requests, front=True)
            # The wait clock starts now: time spent training since the last extract is not silence.
            self._last_progress = max(self._last_progress, time.monotonic())
            ids = [r.sample_id for r in requests]
            while True:
                if self._fatal is not None:
                    raise self._fatal
                failed = next(
                    (self._pending[i].error for i in ids if self._pending[i].error is not None), None
                )
                if failed is not None:
                    raise failed
                if all(self._pending[i].result is not None for i in ids):
                    break
                if time.monotonic() - self._last_progress > self.timeout_s:
                    raise HiddenStateServiceError(
                        f"no hidden states arrived for {self.timeout_s:.0f} s; endpoints: "
                        + "; ".join(f"{e.address}: {e.breaker.describe()}" for e in self._endpoints)
                    )
                self._cond.wait(timeout=1.0)
            results = []
            for sample_id in ids:
                pending = self._pending.pop(sample_id)
                self._bytes_sent -= pending.num_bytes
                results.append(pending.result)
            self._cond.notify_all()  # budget freed
        return results  # type: ignore[return-value]

    def _enqueue(self, requests: Sequence[SampleRequest], *, front: bool) -> None:
        new = []
        for request in requests:
            pending = self._pending.get(request.sample_id)
            if pending is not None:
                pending.urgent = pending.urgent or front
                if front and pending.call is None and pending.result is None:
                    new.append(request.sample_id)  # queued behind prefetches: move it up
                    self._queue.remove(request.sample_id)
                continue
            self._pending[request.sample_id] = _Pending(
                request=request,
                digest=token_ids_digest(request.input_ids),
                num_bytes=int(request.input_ids.numel()) * self._bytes_per_token,
                urgent=front,
            )
            new.append(request.sample_id)
        if front:
            self._queue.extendleft(reversed(new))
        else:
            self._queue.extend(new)
        self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for stream in self._streams:
            stream.cancel()
        for stream in self._streams:
            stream.join(timeout=10)
        for endpoint in self._endpoints:
            endpoint.channel.close()

    # ------------------------------------------------------------------ called by streams
    def _next_request(self, call: _Call) -> pb.ExtractRequest | None:
        """Block until a request may be sent on `call` within the byte budget; None = stop."""
        with self._cond:
            while True:
                if self._closing or not call.alive or self._fatal is not None:
                    return None
                if self._queue:
                    head = self._pending[self._queue[0]]
                    # `extract`'s own samples go regardless: they are consumed at once, and
                    # holding them back behind unconsumed prefetches could wait forever.
                    # Otherwise one always goes when nothing is in flight, however big.
                    if (
                        head.urgent
                        or self._bytes_sent == 0
                        or self._bytes_sent + head.num_bytes <= self.inflight_bytes
                    ):
                        self._queue.popleft()
                        head.call = call
                        call.assigned.add(head.request.sample_id)
                        self._bytes_sent += head.num_bytes
                        return pb.ExtractRequest(
                            sample_id=head.request.sample_id,
                            token_ids=head.request.input_ids.tolist(),
                            layer_ids=self._layer_ids,
                        )
                self._cond.wait(timeout=1.0)

    def _requeue(self, sample_id: int) -> None:
        """Back to the front of the queue (lock held): its bytes are no longer in flight."""
        pending = self._pending[sample_id]
        pending.call = None
        self._bytes_sent -= pending.num_bytes
        self._queue.appendleft(sample_id)

    def _deliver(self, call: _Call, decoded: DecodedSample, *, on_payload_channel: bool = False) -> None:
        endpoint = call.stream.endpoint
        with self._cond:
            pending = self._pending.get(decoded.sample_id)
            if pending is None or pending.call is not call or pending.result is not None:
                return  # consumed already, or re-sent elsewhere after this call was given up
        # Outside the lock (a pass over every byte, ~4 ms per 64 MiB): other streams deliver and
        # the trainer consumes meanwhile. `pending.request` and `digest` never change.
        problem = self._validate(decoded, pending)
        with self._cond:
            if (
                self._pending.get(decoded.sample_id) is not pending
                or pending.call is not call
                or pending.result is not None
            ):
                return  # the call was given up (or the sample delivered) while it was checked
            if problem is not None:
                pending.error = HiddenStateServiceError(f"{endpoint.address}: {problem}")
            else:
                tensor = decoded.tensor  # [t, K+1, H]
                num_aux = len(self._target_layer_ids)
                pending.result = SampleHiddenStates(
                    sample_id=decoded.sample_id,
                    aux=tensor[:, :num_aux].flatten(1),
                    last=tensor[:, self._last_index],
                )
            call.assigned.discard(decoded.sample_id)
            endpoint.delivered += 1
            endpoint.delivered_on_payload_channel += on_payload_channel
            self._last_progress = time.monotonic()
            self._cond.notify_all()

    def _validate(self, decoded: DecodedSample, pending: _Pending) -> str | None:
        sample_id, tensor = decoded.sample_id, decoded.tensor
        t = int(pending.request.input_ids.numel())
        expected_shape = (t, len(self._layer_ids), self._fingerprint.hidden_size)
        if decoded.token_ids_sha256 != pending.digest:
            return (
                f"sample {sample_id}: the service computed hidden states for other token ids than were sent"
            )
        if decoded.layer_ids != self._layer_ids:
            return f"sample {sample_id}: layer ids {decoded.layer_ids} came back, {self._layer_ids} asked for"
        if tuple(tensor.shape) != expected_shape:
            return f"sample {sample_id}: shape {tuple(tensor.shape)}, expected {expected_shape}"
        if tensor.dtype != self._dtype:
            return f"sample {sample_id}: dtype {tensor.dtype}, the service announced {self._dtype}"
        return check_finite_nonzero(tensor, what=f"sample {sample_id}")

    def _reject(self, call: _Call, sample_id: int, code: grpc.StatusCode, message: str) -> None:
        endpoint = call.stream.endpoint
        with self._cond:
            pending = self._pending.get(sample_id)
            if pending is None or pending.call is not call:
                return
            call.assigned.discard(sample_id)
            pending.failures += 1
            if code in RETRYABLE and pending.failures < MAX_SAMPLE_FAILURES:
                # The verifier failed on this sample (out of memory, a transient fault): try again,
                # maybe elsewhere, but not forever.
                self._requeue(sample_id)
                endpoint.breaker.record_failure(f"{code.name}: {message}")
                logger.warning(
                    "%s failed sample %d (%s: %s); retrying", endpoint.address, sample_id, code.name, message
                )
            else:
                pending.error = HiddenStateServiceError(f"{endpoint.address}: {message} ({code.name})")
            self._cond.notify_all()

    def _give_back(self, call: _Call) -> None:
        """The call ended: its unanswered requests go back to the front of the queue."""
        with self._cond:
            call.alive = False
            orphans = [i for i in call.assigned if i in self._pending and self._pending[i].result is None]
            for sample_id in sorted(orphans, reverse=True):
                self._requeue(sample_id)
            call.assigned.clear()
            if orphans:
                logger.warning(
                    "%s: call lost with %d sample(s) in flight; they are re-sent",
                    call.stream.endpoint.address,
                    len(orphans),
                )
            self._cond.notify_all()

    def _fail(self, error: HiddenStateServiceError) -> None:
        with self._cond:
            if self._fatal is None:
                self._fatal = error
            self._cond.notify_all()


class _Stream(threading.Thread):
    """One Extract call at a time to one endpoint, reconnecting until the source closes."""

    def __init__(self, source: GrpcSource, endpoint: _Endpoint, index: int) -> None:
        super().__init__(name=f"hidden-states-{endpoint.address}-{index}", daemon=True)
        self.source = source
        self.endpoint = endpoint
        self._rpc: grpc.Future | None = None
        self._stub = pb_grpc.HiddenStatesStub(endpoint.channel)
        # Extract by hand: `parse_frame` leaves each payload a view of the received bytes (the
        # generated stub would copy it into a message first), so frames land with one copy.
        self._extract = endpoint.channel.stream_stream(
            EXTRACT_METHOD,
            request_serializer=pb.ExtractRequest.SerializeToString,
            response_deserializer=parse_frame,
        )

    def cancel(self) -> None:
        rpc = self._rpc
        if rpc is not None:
            rpc.cancel()

    def run(self) -> None:
        source, breaker = self.source, self.endpoint.breaker
        while not source._closing and source._fatal is None:
            resume_at = time.monotonic() + breaker.wait_before_attempt()
            while time.monotonic() < resume_at and not source._closing:
                time.sleep(min(resume_at - time.monotonic(), 0.2))  # short naps so close() is prompt
            if source._closing:
                return
            call = _Call(stream=self)
            try:
                if self.endpoint.info is None and not self._check_late_endpoint():
                    return
                self._run_call(call)
            except grpc.RpcError as exc:
                if source._closing:
                    return
                code, message = exc.code(), f"{exc.code().name}: {exc.details()}"
                if code not in RETRYABLE:
                    # FAILED_PRECONDITION (another verifier), UNIMPLEMENTED, ...: no retry fixes it.
                    source._fail(
                        HiddenStateServiceError(f"{self.endpoint.address}: {exc.details()} ({code.name})")
                    )
                    return
                breaker.record_failure(message)
                logger.warning("%s: %s (%s)", self.endpoint.address, message, breaker.describe())
            except WireError as exc:
                breaker.record_failure(f"malformed response: {exc}")
                logger.error("%s: malformed response: %s", self.endpoint.address, exc)
            except PayloadChannelError as exc:
                if source._closing:
                    return
                breaker.record_failure(f"payload connection: {exc}")
                logger.warning(
                    "%s: payload connection failed: %s (%s)", self.endpoint.address, exc, breaker.describe()
                )
            finally:
                self._rpc = None
                source._give_back(call)

    def _run_call(self, call: _Call) -> None:
        info = self.endpoint.info
        offer = self.source.payload_transport == "auto" and info is not None and info.payload_port != 0
        token = new_token() if offer else None
        metadata = [(EXPECT_VERIFIER_KEY, self.source._expected_json)]
        if token is not None:
            metadata.append((PAYLOAD_TOKEN_KEY, token.hex()))
        rpc = self._extract(self._requests(call), metadata=tuple(metadata))
        self._rpc = rpc
        sock = self._open_payload_channel(rpc, token) if token is not None else None
        if sock is None:
            self._read_responses(call, rpc)
            return
        reader = _PayloadReader(self, call, sock, rpc)
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

    def _read_responses(self, call: _Call, rpc: grpc.Future) -> None:
        assembler = FrameAssembler(self.source._buffers)
        for response in rpc:
            if response.HasField("error"):
                code = _CODE_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
                self.source._reject(call, response.sample_id, code, response.error.message)
                continue
            decoded = assembler.add(response)
            if decoded is not None:
                self.source._deliver(call, decoded)
                self.endpoint.breaker.record_success()

    def _requests(self, call: _Call) -> Iterator[pb.ExtractRequest]:
        while True:
            request = self.source._next_request(call)
            if request is None:
                return
            yield request

    def _check_late_endpoint(self) -> bool:
        """An endpoint that was down at start must serve the same verifier and layers too."""
        info = self._stub.GetInfo(pb.GetInfoRequest(), timeout=10.0)
        problems = self.source.fingerprint.mismatches(
            fingerprint_from_info(info), this_side="other endpoints", other_side=self.endpoint.address
        )
        missing = [i for i in self.source._layer_ids if i not in info.layer_ids]
        if problems or missing:
            detail = problems + ([f"layer ids {missing} are not served"] if missing else [])
            message = f"{self.endpoint.address} serves something else:\n  " + "\n  ".join(detail)
            self.source._fail(HiddenStateServiceError(message))
            return False
        self.endpoint.info = info
        return True


class _PayloadReader(threading.Thread):
    """Reads one call's payload connection and delivers its samples, until `stop` or a failure.

    A failure (the connection closes without RECORD_END, or a malformed record) is kept in
    `failure` and cancels the call, so the stream's usual path gives the call's unanswered
    samples back and reconnects.
    """

    def __init__(self, stream: _Stream, call: _Call, sock: socket.socket, rpc: grpc.Future) -> None:
        super().__init__(name=f"{stream.name}-payload", daemon=True)
        self.stream, self.call, self.sock, self.rpc = stream, call, sock, rpc
        info = stream.endpoint.info
        assert info is not None  # checked before any call runs
        self.records = RecordReader(
            sock,
            buffers=stream.source._buffers,
            # No request may get more: a larger announcement is a broken stream, not a sample.
            max_sample_bytes=max(info.max_length, 1) * stream.source._bytes_per_token,
        )
        self.failure: PayloadChannelError | WireError | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        source, endpoint = self.stream.source, self.stream.endpoint
        try:
            while (decoded := self.records.read()) is not None:
                source._deliver(self.call, decoded, on_payload_channel=True)
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
