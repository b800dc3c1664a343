"""The `dflash.v1.HiddenStates` RPCs on top of the scheduler.

Extract: a reader thread pulls requests off the stream, validates each one and queues it; the
RPC's own thread encodes computed samples into frames as they finish. A bad request gets an
`ExtractResponse.error` (INVALID_ARGUMENT, naming the problem) and the stream carries on; a
client that expects another verifier is refused with FAILED_PRECONDITION before anything runs.

A call that offers a payload token (`PAYLOAD_TOKEN_KEY`) and reaches a service with a payload
port gets that port in its initial metadata; once the client's connection is bound (see
`payload_listener.py`), the call's samples go on it as records, while errors and the end of the
call stay on the stream. A connection that breaks ends the call with UNAVAILABLE, so the client
asks again for what it did not get.

A service started with `--generate-only` answers GetInfo and Generate; Extract is refused with
FAILED_PRECONDITION naming the flag (a trainer pointed at it stops with that message).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch
from pydantic import ValidationError

from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.verifier import VerifierFingerprint
from dflash_core.wire.codec import DTYPE_NAMES, encode_sample_frames, error_response
from dflash_core.wire.identity import EXPECT_VERIFIER_KEY
from dflash_core.wire.payload_channel import (
    PAYLOAD_PORT_KEY,
    PAYLOAD_TOKEN_KEY,
    send_end,
    send_sample,
    token_from_metadata,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.backends.base import BackendInfo, GenerationParams
from services.hidden_states.payload_listener import PayloadBinding, PayloadListener
from services.hidden_states.scheduler import ByteBudget, ComputedSample, ExtractJob, Scheduler, StreamOutbox

logger = logging.getLogger(__name__)

SERVER_VERSION = "dflash-hidden-states/1"
GENERATE_ONLY_REFUSAL = (
    "this service was started with --generate-only; it serves Generate only. Hidden states "
    "(training, generate-offline) need a service started without --generate-only"
)


# A token id takes at most 5 bytes on the wire (varint), a repeated field's entry a few more.
_BYTES_PER_TOKEN, _BYTES_PER_ENTRY, _MESSAGE_SLACK = 5, 16, 4096
# The service's defaults are its config's (one place: `dflash serve-hidden-states --help`).
_SERVE = ServeHiddenStatesConfig.model_fields
DEFAULT_MAX_PENDING_BYTES: int = _SERVE["max_pending_bytes"].default
DEFAULT_STALL_TIMEOUT_S: float = _SERVE["stall_timeout_s"].default


@dataclass(frozen=True)
class GenerateLimits:
    """What one Generate call may ask for (--max-generate-prompts, --max-generate-tokens)."""

    max_prompts: int = _SERVE["max_generate_prompts"].default
    max_tokens: int = _SERVE["max_generate_tokens"].default  # prompts + max_new_tokens, summed


def max_request_bytes(info: BackendInfo, limits: GenerateLimits) -> int:
    """The largest request message a valid call can need: the server refuses bigger ones unparsed."""
    extract = _BYTES_PER_TOKEN * info.max_length + _BYTES_PER_ENTRY * len(info.layer_ids)
    generate = _BYTES_PER_TOKEN * limits.max_tokens + _BYTES_PER_ENTRY * limits.max_prompts
    return max(extract, generate) + _MESSAGE_SLACK


class HiddenStatesServicer(pb_grpc.HiddenStatesServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        *,
        max_frame_bytes: int,
        max_pending_per_stream: int,
        max_streams: int,
        payload_listener: PayloadListener | None = None,
        generate_limits: GenerateLimits | None = None,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self.scheduler = scheduler
        self.generate_limits = generate_limits or GenerateLimits()
        # All streams' hidden states held at once, in bytes; a stream whose client takes none of
        # its samples for stall_timeout_s is cancelled, so one client cannot hold the rest hostage.
        self.budget = ByteBudget(max_pending_bytes)
        self.stall_timeout_s = stall_timeout_s
        self._sending: dict[int, tuple[grpc.ServicerContext, float]] = {}  # stream -> (call, since)
        self._sending_lock = threading.Lock()
        self._watching = threading.Event()
        self._watcher = threading.Thread(target=self._cancel_stalled_streams, name="stall-watch", daemon=True)
        self._watcher.start()
        self.payload_listener = payload_listener
        self.samples_on_payload_channel = 0  # how many went off gRPC (tests and the bench read it)
        self._count_lock = threading.Lock()
        # gRPC's maximum_concurrent_rpcs counts every call; this bounds Extract streams alone, so
        # GetInfo, Generate and health keep answering while every stream slot is taken.
        self._stream_slots = threading.BoundedSemaphore(max_streams)
        self.max_streams = max_streams
        self.info: BackendInfo = scheduler.backend.info
        self.max_frame_bytes = max_frame_bytes
        self.max_pending_per_stream = max_pending_per_stream
        self._columns = {layer_id: i for i, layer_id in enumerate(self.info.layer_ids)}

    # ------------------------------------------------------------------ GetInfo
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.ServiceInfo:
        port = self.payload_listener.port if self.payload_listener is not None else 0
        return service_info(
            self.info, max_frame_bytes=self.max_frame_bytes, payload_port=port, limits=self.generate_limits
        )

    # ------------------------------------------------------------------ Extract
    def Extract(self, request_iterator, context: grpc.ServicerContext) -> Iterator[bytes]:
        if self.info.generate_only:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, GENERATE_ONLY_REFUSAL)
        self._check_expected_verifier(context)
        if not self._stream_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this service already serves {self.max_streams} Extract streams (--max-streams); "
                "try another endpoint or later",
            )
        binding = None
        try:
            binding = self._offer_payload_channel(context)
            yield from self._serve_stream(request_iterator, context, binding)
        finally:
            if binding is not None and self.payload_listener is not None:
                self.payload_listener.release(binding)
            self._stream_slots.release()

    def _offer_payload_channel(self, context: grpc.ServicerContext) -> PayloadBinding | None:
        """Register the call's payload token and tell the client where to connect. The initial
        metadata goes out at once either way: a client that offered a token waits for it."""
        text = dict(context.invocation_metadata()).get(PAYLOAD_TOKEN_KEY)
        if text is None:
            return None
        try:
            token = token_from_metadata(text)
        except ValueError as exc:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{PAYLOAD_TOKEN_KEY} metadata is malformed: {exc}"
            )
        listener = self.payload_listener
        binding = listener.expect(token) if listener is not None else None
        if listener is None or binding is None:  # no payload port, or a token already announced
            context.send_initial_metadata(())
            return None
        context.send_initial_metadata(((PAYLOAD_PORT_KEY, str(listener.port)),))
        return binding

    def _serve_stream(
        self, request_iterator, context: grpc.ServicerContext, binding: PayloadBinding | None
    ) -> Iterator[bytes]:
        outbox = StreamOutbox(self.max_pending_per_stream, self.budget)
        context.add_callback(outbox.cancelled.set)
        if binding is not None:
            context.add_callback(binding.close)  # wakes a send blocked on a client that went away
        reader = threading.Thread(
            target=self._read_requests, args=(request_iterator, outbox), name="extract-reader", daemon=True
        )
        reader.start()
        try:
            while True:
                try:
                    sample = outbox.results.get(timeout=0.5)
                except queue.Empty:
                    if outbox.cancelled.is_set():
                        return  # the client went away: free this pool thread
                    continue
                sock = binding.socket if binding is not None else None
                if sample is None:
                    if sock is not None:
                        self._send_end(sock)
                    return
                with self._sending_lock:
                    self._sending[id(outbox)] = (context, time.monotonic())
                try:
                    if sock is not None and sample.tensor is not None:
                        self._send_on_payload_channel(sock, sample, outbox, context)
                    else:  # errors always, and samples computed before the connection was bound
                        yield from self._encode(sample)
                finally:
                    with self._sending_lock:
                        self._sending.pop(id(outbox), None)
                    outbox.release(sample.charge)
        finally:
            outbox.drain()

    def _cancel_stalled_streams(self) -> None:
        while not self._watching.wait(timeout=min(1.0, self.stall_timeout_s / 4)):
            now = time.monotonic()
            with self._sending_lock:
                stalled = [
                    (key, ctx)
                    for key, (ctx, since) in self._sending.items()
                    if now - since > self.stall_timeout_s
                ]
                for key, _ in stalled:
                    self._sending.pop(key, None)
            for _, context in stalled:
                logger.warning(
                    "an Extract client took no sample for %.0f s: cancelling its stream (its hidden states "
                    "held the service's memory)",
                    self.stall_timeout_s,
                )
                context.cancel()

    def close(self) -> None:
        self._watching.set()

    def _send_on_payload_channel(
        self, sock: socket.socket, sample: ComputedSample, outbox: StreamOutbox, context: grpc.ServicerContext
    ) -> None:
        try:
            send_sample(
                sock, sample.sample_id, sample.tensor, token_ids=sample.token_ids, layer_ids=sample.layer_ids
            )
        except OSError as exc:
            if outbox.cancelled.is_set():
                return  # the call is over anyway; the closed connection is why the send failed
            # The sample may be half-written: the whole call fails and the client asks again.
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the payload connection broke: {exc}")
        with self._count_lock:
            self.samples_on_payload_channel += 1

    @staticmethod
    def _send_end(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client is gone; the stream's own end still goes
            send_end(sock)

    def _read_requests(self, request_iterator, outbox: StreamOutbox) -> None:
        try:
            for request in request_iterator:
                job_or_error = self._validate(request, outbox)
                charge = outbox.reserve(self._bytes_of(job_or_error))
                if charge is None:
                    return
                job_or_error.charge = charge
                if isinstance(job_or_error, ExtractJob):
                    self.scheduler.submit_extract(job_or_error)
                else:
                    outbox.put(job_or_error)
        except grpc.RpcError:
            pass  # the client went away; the RPC thread sees the cancellation
        except Exception:
            logger.exception("extract reader failed")
        finally:
            self._close_when_drained(outbox)

    def _bytes_of(self, job: ExtractJob | ComputedSample) -> int:
        """The hidden states a valid request will produce ([t, layers, H] of the wire dtype)."""
        if not isinstance(job, ExtractJob):
            return 0
        per_row = len(job.layer_ids) * self.info.fingerprint.hidden_size * self.info.dtype.itemsize
        return int(job.token_ids.numel()) * per_row

    def _close_when_drained(self, outbox: StreamOutbox) -> None:
        # Every reserved slot is released once its sample is sent; holding all of them means
        # nothing is queued or in flight any more, so the response stream may end.
        for _ in range(self.max_pending_per_stream):
            if outbox.reserve() is None:
                return
        outbox.close()

    def _validate(self, request: pb.ExtractRequest, outbox: StreamOutbox) -> ExtractJob | ComputedSample:
        # Lengths first: no tensor or list is built for a request that is refused.
        count, served = len(request.token_ids), list(self.info.layer_ids)
        layer_ids = [int(i) for i in request.layer_ids] if len(request.layer_ids) <= len(served) else []
        problem = None
        if count == 0:
            problem = "token_ids is empty"
        elif count > self.info.max_length:
            problem = (
                f"{count} tokens is longer than this service's max length {self.info.max_length} "
                "(dflash serve-hidden-states --max-length)"
            )
        elif (largest := max(request.token_ids)) >= self.info.fingerprint.vocab_size:
            problem = (
                f"token id {largest} is outside the verifier's vocabulary of "
                f"{self.info.fingerprint.vocab_size}: was the data tokenized for another model?"
            )
        elif len(request.layer_ids) > len(served):
            problem = f"{len(request.layer_ids)} layer ids asked for; this service serves {served}"
        elif not layer_ids:
            problem = f"layer_ids is empty; this service serves {served}"
        elif unknown := [i for i in layer_ids if i not in self._columns]:
            problem = (
                f"layer ids {unknown} are not served here; this service captures {served} "
                "(restart it with the trainer's --target-layer-ids)"
            )
        elif len(set(layer_ids)) != len(layer_ids):
            problem = f"layer_ids {layer_ids} repeats an id"
        if problem is not None:
            return ComputedSample(
                sample_id=request.sample_id,
                token_ids=torch.empty(0, dtype=torch.long),
                layer_ids=layer_ids,
                tensor=None,
                error_code=grpc.StatusCode.INVALID_ARGUMENT,
                error=f"sample {request.sample_id}: {problem}",
            )
        return ExtractJob(
            sample_id=request.sample_id,
            token_ids=torch.tensor(request.token_ids, dtype=torch.long),
            layer_columns=[self._columns[i] for i in layer_ids],
            layer_ids=layer_ids,
            outbox=outbox,
        )

    def _encode(self, sample: ComputedSample) -> Iterator[bytes]:
        """Serialized ExtractResponse frames (see `register`: Extract sends bytes as they are)."""
        if sample.tensor is None:
            code = sample.error_code or grpc.StatusCode.INTERNAL
            yield error_response(sample.sample_id, code.value[0], sample.error).SerializeToString()
            return
        yield from encode_sample_frames(
            sample.sample_id,
            sample.tensor,
            token_ids=sample.token_ids,
            layer_ids=sample.layer_ids,
            max_frame_bytes=self.max_frame_bytes,
        )

    def _check_expected_verifier(self, context: grpc.ServicerContext) -> None:
        expected = dict(context.invocation_metadata()).get(EXPECT_VERIFIER_KEY)
        if expected is None:
            return
        try:
            theirs = VerifierFingerprint(**json.loads(expected))
        except (ValueError, TypeError, ValidationError) as exc:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{EXPECT_VERIFIER_KEY} metadata is malformed: {exc}"
            )
        problems = theirs.mismatches(self.info.fingerprint, this_side="trainer", other_side="service")
        if problems:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this service runs another verifier than the trainer expects:\n  " + "\n  ".join(problems),
            )

    # ------------------------------------------------------------------ Generate
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        params, limits = request.params, self.generate_limits
        if not request.prompts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no prompts")
        if len(request.prompts) > limits.max_prompts:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.prompts)} prompts in one call; this service takes at most "
                f"{limits.max_prompts} (--max-generate-prompts): split the request",
            )
        tokens = sum(len(p.token_ids) for p in request.prompts) + len(request.prompts) * params.max_new_tokens
        if tokens > limits.max_tokens:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{tokens} tokens (prompts + max_new_tokens each) in one call; this service takes at most "
                f"{limits.max_tokens} (--max-generate-tokens): split the request",
            )
        if params.max_new_tokens < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "params.max_new_tokens must be >= 1")
        if params.temperature < 0 or not 0 <= params.top_p <= 1:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"temperature {params.temperature} must be >= 0 and top_p {params.top_p} in [0, 1]",
            )
        prompts = []
        for index, prompt in enumerate(request.prompts):
            ids = list(prompt.token_ids)
            total = len(ids) + params.max_new_tokens
            if not ids:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt {index} is empty")
            if total > self.info.max_length:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt {index}: {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                    f"service's max length {self.info.max_length}",
                )
            if max(ids) >= self.info.fingerprint.vocab_size:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt {index}: token id {max(ids)} is outside the vocabulary of "
                    f"{self.info.fingerprint.vocab_size}",
                )
            prompts.append(ids)
        job = self.scheduler.submit_generate(
            prompts,
            GenerationParams(
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p if params.top_p > 0 else 1.0,
                top_k=params.top_k,
                seed=params.seed,
                stop_token_ids=tuple(params.stop_token_ids),
            ),
        )
        future = job.future
        context.add_callback(job.abandon)  # the call ended (or was cancelled): stop generating for it
        remaining = context.time_remaining()
        try:
            # Without a client deadline gRPC reports an effectively infinite time remaining.
            completions = future.result(
                timeout=remaining if remaining is not None and remaining < 1e6 else None
            )
        except TimeoutError:
            job.abandon()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "generation did not finish before the deadline")
        except Exception as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {exc}")
        return pb.GenerateResponse(
            completions=[
                pb.Completion(token_ids=c.token_ids, finish_reason=c.finish_reason) for c in completions
            ]
        )


def service_info(
    info: BackendInfo, *, max_frame_bytes: int, payload_port: int = 0, limits: GenerateLimits | None = None
) -> pb.ServiceInfo:
    fp, limits = info.fingerprint, limits or GenerateLimits()
    return pb.ServiceInfo(
        verifier_name_or_path=fp.name_or_path,
        architecture=fp.architecture,
        num_layers=fp.num_layers,
        hidden_size=fp.hidden_size,
        vocab_size=fp.vocab_size,
        tokenizer_sha256=fp.tokenizer_sha256,
        dtype=DTYPE_NAMES[info.dtype],
        max_length=info.max_length,
        backend=info.name,
        layer_ids=list(info.layer_ids),
        max_frame_bytes=max_frame_bytes,
        max_batch_tokens=info.max_batch_tokens,
        server_version=SERVER_VERSION,
        payload_port=payload_port,
        engine_replicas=info.engine_replicas,
        max_generate_prompts=limits.max_prompts,
        max_generate_tokens=limits.max_tokens,
    )


def register(servicer: HiddenStatesServicer, server: grpc.Server) -> None:
    """Add the service to `server`: the generated registration, except that Extract's responses
    are already serialized frames (`encode_sample_frames` writes the payload once instead of
    protobuf copying it three times); the bytes on the wire are the same."""
    handlers = {
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo,
            request_deserializer=pb.GetInfoRequest.FromString,
            response_serializer=pb.ServiceInfo.SerializeToString,
        ),
        "Extract": grpc.stream_stream_rpc_method_handler(
            servicer.Extract,
            request_deserializer=pb.ExtractRequest.FromString,
            response_serializer=bytes,  # frames arrive serialized
        ),
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["HiddenStates"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
