"""The trainer's side of the hidden-state service: a `HiddenStateSource` over gRPC streams.

    source = GrpcSource(endpoints, target_layer_ids=[2, 18, 33], expected=fingerprint,
                        inflight_bytes=1 << 30)
    source.prefetch(next_steps_requests)   # starts them moving; returns at once
    states = source.extract(this_step_requests)

Endpoints are admitted by `ServiceSet` (all serve one verifier). Requests wait in one queue that
every endpoint's `ExtractStream`s pull from while the bytes in flight stay under `inflight_bytes`.
Every response is checked (digest, shape, layer ids, dtype, finite, non-zero) and kept only while
its request is still assigned to the stream that delivered it, so each sample arrives exactly once,
in-band or on the payload side channel (docs/architecture.md). Broken streams requeue their work;
FAILED_PRECONDITION and INVALID_ARGUMENT are configuration errors and raise.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from dflash_core.config import GenerateOfflineConfig, TrainConfig
from dflash_core.verifier import VerifierFingerprint
from dflash_core.wire.codec import (
    WIRE_DTYPES,
    DecodedSample,
    SampleBuffers,
    check_finite_nonzero,
    token_ids_digest,
)
from dflash_core.wire.identity import fingerprint_from_info
from dflash_core.wire.pb import hidden_states_pb2 as pb
from services.hidden_states.service_set import HiddenStateServiceError, ServiceSet
from services.trainer.extract_stream import (
    RETRYABLE,
    ExtractCall,
    ExtractStream,
    PayloadTransport,
    StreamEndpoint,
    StreamSettings,
)
from services.trainer.sources import SampleHiddenStates, SampleRequest

__all__ = ["GrpcSource", "HiddenStateServiceError", "PayloadTransport"]

logger = logging.getLogger(__name__)

# A sample the service fails on this many times is an error, not bad luck.
MAX_SAMPLE_FAILURES = 3
# Once one endpoint answered at start-up, how long to wait for the others before going ahead.
OTHER_ENDPOINTS_GRACE_S = 10.0
# Give up when no endpoint delivered anything for this long (as TrainConfig.service_timeout_s).
DEFAULT_TIMEOUT_S = 300.0


@dataclass
class _Pending:
    request: SampleRequest
    digest: bytes
    num_bytes: int  # what the answer will occupy: counted against inflight_bytes once sent
    urgent: bool = False  # asked for by `extract`: sent even over the byte budget
    call: ExtractCall | None = None  # the call it was sent on; None while queued
    failures: int = 0  # per-sample errors the service reported (INTERNAL, ...)
    result: SampleHiddenStates | None = None
    error: HiddenStateServiceError | None = None


class GrpcSource:
    """Hidden states from a set of service endpoints (module docstring); `close` when done."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        target_layer_ids: Sequence[int],
        expected: VerifierFingerprint | None = None,
        inflight_bytes: int = 1 << 30,
        streams_per_endpoint: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
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
        self._services = ServiceSet(endpoints)
        try:
            info = self._services.connect(
                timeout_s=connect_timeout_s if connect_timeout_s is not None else timeout_s,
                others_grace_s=OTHER_ENDPOINTS_GRACE_S,
            )
            self._fingerprint = fingerprint_from_info(info)
            if expected is not None:
                self._check_expected(expected, info)
            self._check_layers(info)
            dtype = WIRE_DTYPES.get(info.dtype)
            if dtype is None:
                raise HiddenStateServiceError(
                    f"the service sends dtype {info.dtype!r}, which this trainer cannot read"
                )
        except BaseException:
            self._services.close()
            raise
        self._dtype = dtype
        # Layer N rides along for the training targets; asked for once when it is an aux id too
        # (the service refuses a repeated id).
        num_layers = self._fingerprint.num_layers
        self._layer_ids = [
            *self._target_layer_ids,
            *([] if num_layers in self._target_layer_ids else [num_layers]),
        ]
        self._last_index = self._layer_ids.index(num_layers)
        bytes_per_token = len(self._layer_ids) * self._fingerprint.hidden_size * dtype.itemsize
        self._bytes_per_token = bytes_per_token

        self._cond = threading.Condition()
        self._queue: collections.deque[int] = collections.deque()
        self._pending: dict[int, _Pending] = {}
        self._bytes_sent = 0  # of samples sent and not yet consumed: what inflight_bytes bounds
        self._last_progress = time.monotonic()
        self._fatal: HiddenStateServiceError | None = None
        self._closing = False
        settings = StreamSettings(
            layer_ids=self._layer_ids,
            expected_json=json.dumps((expected or self._fingerprint).model_dump()),
            payload_transport=payload_transport,
            # Reused sample memory (no page faults per sample). The trainer holds consumed
            # samples for a step beside those in flight, hence twice the budget.
            buffers=SampleBuffers(2 * inflight_bytes),
            bytes_per_token=bytes_per_token,
        )
        self._endpoints = [StreamEndpoint(service=e) for e in self._services.endpoints]
        self._streams = [
            ExtractStream(self, endpoint, index=index, settings=settings, services=self._services)
            for endpoint in self._endpoints
            for index in range(streams_per_endpoint)
        ]
        for stream in self._streams:
            stream.start()

    @classmethod
    def from_config(
        cls,
        config: TrainConfig | GenerateOfflineConfig,
        *,
        target_layer_ids: Sequence[int],
        expected: VerifierFingerprint,
        inflight_bytes: int | None = None,
        streams_per_endpoint: int | None = None,
    ) -> GrpcSource:
        """The source on `config`'s endpoints with its transfer settings. `inflight_bytes` and
        `streams_per_endpoint` override the config's (live evaluation runs a small client)."""
        if isinstance(config, TrainConfig):
            assert config.hidden_states_endpoint, "the config names no hidden-state service"
            endpoints, timeout_s = config.hidden_states_endpoint, config.service_timeout_s
        else:
            endpoints, timeout_s = config.vllm_endpoint, DEFAULT_TIMEOUT_S
        return cls(
            endpoints,
            target_layer_ids=target_layer_ids,
            expected=expected,
            inflight_bytes=config.inflight_bytes if inflight_bytes is None else inflight_bytes,
            streams_per_endpoint=(
                config.streams_per_endpoint if streams_per_endpoint is None else streams_per_endpoint
            ),
            timeout_s=timeout_s,
            payload_transport=config.payload_transport,
        )

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> VerifierFingerprint:
        return self._fingerprint

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self._target_layer_ids)

    @property
    def service_info(self) -> pb.ServiceInfo:
        """What the endpoints serve (the first that answered; all serve the same verifier)."""
        return self._services.info

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
        self._services.close()

    # ------------------------------------------------------------------ called by streams (StreamOwner)
    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def stopped(self) -> bool:
        return self._closing or self._fatal is not None

    def next_request(self, call: ExtractCall) -> pb.ExtractRequest | None:
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

    def deliver(self, call: ExtractCall, decoded: DecodedSample, *, on_payload_channel: bool = False) -> None:
        endpoint = call.endpoint
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

    def reject(self, call: ExtractCall, sample_id: int, code: grpc.StatusCode, message: str) -> None:
        endpoint = call.endpoint
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

    def give_back(self, call: ExtractCall) -> None:
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
                    call.endpoint.address,
                    len(orphans),
                )
            self._cond.notify_all()

    def fail(self, error: HiddenStateServiceError) -> None:
        with self._cond:
            if self._fatal is None:
                self._fatal = error
            self._cond.notify_all()
