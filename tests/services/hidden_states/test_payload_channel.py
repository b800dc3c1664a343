"""The payload side channel: its records on a socket, and the service's payload port on 127.0.0.1.

What must hold: a record carries a sample bit for bit and a broken or malformed connection raises
instead of handing out a wrong sample; GetInfo advertises the port (0 when it is off); a call
that offers a token gets the port and, once its connection is bound, its samples on that
connection, equal byte for byte to the same samples in-band; garbage, an unknown token and a
second connection for a bound call are refused without touching the bound call; a client that
never reads its connection costs the service a bounded number of samples.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from dflash_core.wire import payload_channel
from dflash_core.wire.codec import DecodedSample, FrameAssembler, WireError, token_ids_digest
from dflash_core.wire.payload_channel import (
    PAYLOAD_PORT_KEY,
    PAYLOAD_TOKEN_KEY,
    PayloadChannelError,
    RecordReader,
    new_token,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb
from dflash_core.wire.pb import hidden_states_pb2_grpc as pb_grpc
from services.hidden_states.endpoints import open_channel
from services.hidden_states.server import HiddenStateServer
from services.trainer.grpc_source import GrpcSource
from services.trainer.sources import SampleRequest
from tests.factories.services import running_service
from tests.services.hidden_states.conftest import HIDDEN_SIZE, NUM_LAYERS

TARGET_LAYERS = [1, 2]
SERVED_LAYERS = [1, 2, NUM_LAYERS]
VOCAB = 400
CALL_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------- records on a socket


def _sample(num_tokens: int, *, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(num_tokens, 3, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


@contextlib.contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    with left, right:
        yield left, right


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_records_carry_samples_bit_for_bit_then_end(dtype):
    tensors = {7: _sample(5, seed=1, dtype=dtype), 9: _sample(40, seed=2, dtype=dtype)}
    with socket_pair() as (service, client):
        for sample_id, tensor in tensors.items():
            ids = list(range(sample_id, sample_id + tensor.shape[0]))
            payload_channel.send_sample(service, sample_id, tensor, token_ids=ids, layer_ids=[4, 1, 2])
        payload_channel.send_end(service)
        reader = RecordReader(client, buffers=None, max_sample_bytes=1 << 20)
        received = [reader.read(), reader.read()]
        assert reader.read() is None
    for sample, (sample_id, tensor) in zip(received, tensors.items(), strict=True):
        assert sample is not None and sample.sample_id == sample_id
        assert sample.tensor.dtype == dtype and torch.equal(sample.tensor, tensor)
        assert sample.layer_ids == [4, 1, 2]
        assert sample.token_ids_sha256 == token_ids_digest(range(sample_id, sample_id + tensor.shape[0]))


def _one_record() -> bytes:
    """The bytes of one RECORD_SAMPLE of 8 tokens (a header of about 70 bytes, then 768)."""
    with socket_pair() as (service, client):
        payload_channel.send_sample(service, 1, _sample(8, seed=3), token_ids=[1] * 8, layer_ids=[1, 2, 4])
        service.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := client.recv(1 << 16):
            raw += chunk
    return raw


@pytest.mark.parametrize(
    ("cut", "message"),
    [(0, "without ending the call"), (3, "middle of a record"), (20, "record header"), (-1, "payload")],
)
def test_a_connection_that_closes_early_raises_instead_of_returning_a_sample(cut, message):
    raw = _one_record()[:cut]
    with socket_pair() as (service, client):
        service.sendall(raw)
        service.close()
        with pytest.raises(PayloadChannelError, match=message):
            RecordReader(client, buffers=None, max_sample_bytes=1 << 20).read()


def test_malformed_records_raise_wire_errors():
    with socket_pair() as (service, client):
        service.sendall(b"\x07\x00\x00\x00\x00")  # an unknown kind
        with pytest.raises(WireError, match="kind 7"):
            RecordReader(client, buffers=None, max_sample_bytes=1 << 20).read()
    with socket_pair() as (service, client):
        service.sendall(b"\x01\x03\x00\x00\x00\xff\xff\xff")  # a header that is not protobuf
        with pytest.raises(WireError, match="does not parse"):
            RecordReader(client, buffers=None, max_sample_bytes=1 << 20).read()
    with socket_pair() as (service, client):
        service.sendall(b"\x01\xff\xff\xff\x7f")  # a 2 GiB "header"
        with pytest.raises(WireError, match="header"):
            RecordReader(client, buffers=None, max_sample_bytes=1 << 20).read()
    with socket_pair() as (service, client):
        payload_channel.send_sample(service, 3, _sample(64, seed=4), token_ids=[1] * 64, layer_ids=[1, 2, 4])
        with pytest.raises(WireError, match="sample 3: 6144 bytes announced"):
            RecordReader(client, buffers=None, max_sample_bytes=6143).read()


# ---------------------------------------------------------------------------- the service's port


def request(sample_id: int, length: int) -> pb.ExtractRequest:
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(sample_id)).tolist()
    return pb.ExtractRequest(sample_id=sample_id, token_ids=ids, layer_ids=SERVED_LAYERS)


@pytest.fixture(scope="module")
def server(verifier_path: Path) -> Iterator[HiddenStateServer]:
    # One sample per forward: batch composition changes float rounding, and the byte-for-byte
    # comparison below must see only the transport differ.
    with running_service(verifier_path, target_layer_ids=TARGET_LAYERS, max_batch_tokens=1) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: HiddenStateServer) -> Iterator[pb_grpc.HiddenStatesStub]:
    with open_channel(server.address) as channel:
        yield pb_grpc.HiddenStatesStub(channel)


class SideChannelCall:
    """An Extract call with a payload token whose requests go out only once its connection is
    bound, so every sample must travel on the connection; read with `samples()`. With
    `connect=False` the token is announced and the call waits for `connect()`."""

    def __init__(
        self,
        stub: pb_grpc.HiddenStatesStub,
        requests: Sequence[pb.ExtractRequest],
        *,
        rcvbuf: int | None = None,
        connect: bool = True,
    ) -> None:
        self.token = new_token()
        self._bound = threading.Event()
        self.call = stub.Extract(
            self._requests(requests),
            metadata=((PAYLOAD_TOKEN_KEY, self.token.hex()),),
            timeout=CALL_TIMEOUT_S,
        )
        self.port = int(dict(self.call.initial_metadata())[PAYLOAD_PORT_KEY])
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connecting: fixes the TCP window
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(CALL_TIMEOUT_S)
        if connect:
            self.connect()

    def connect(self) -> None:
        self.sock.connect(("127.0.0.1", self.port))
        payload_channel.present_token(self.sock, self.token)
        self._bound.set()

    def _requests(self, requests: Sequence[pb.ExtractRequest]) -> Iterator[pb.ExtractRequest]:
        self._bound.wait(CALL_TIMEOUT_S)
        yield from requests

    def samples(self) -> dict[int, DecodedSample]:
        """Every record up to the end, then the gRPC stream, which must carry nothing else."""
        reader = RecordReader(self.sock, buffers=None, max_sample_bytes=1 << 30)
        received = {}
        while (sample := reader.read()) is not None:
            received[sample.sample_id] = sample
        in_band = list(self.call)
        assert in_band == [], "a sample or an error came in-band although the connection was bound"
        return received

    def close(self) -> None:
        self.call.cancel()
        self.sock.close()


def in_band(
    stub: pb_grpc.HiddenStatesStub, requests: Sequence[pb.ExtractRequest]
) -> dict[int, DecodedSample]:
    assembler, received = FrameAssembler(), {}
    for response in stub.Extract(iter(requests), timeout=CALL_TIMEOUT_S):
        assert not response.HasField("error"), response.error.message
        if (sample := assembler.add(response)) is not None:
            received[sample.sample_id] = sample
    return received


def wait_until(condition, timeout_s: float = CALL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_get_info_advertises_the_payload_port(stub, server):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert info.payload_port == server.payload_port != 0
    assert info.payload_port != server.port


def test_side_channel_samples_equal_in_band_samples_byte_for_byte(stub, server):
    requests = [request(i, 3 + 9 * i) for i in range(8)]
    sent_before = server.servicer.samples_on_payload_channel
    side = SideChannelCall(stub, requests)
    try:
        off_grpc = side.samples()
    finally:
        side.close()
    assert server.servicer.samples_on_payload_channel - sent_before == len(requests)
    framed = in_band(stub, requests)
    assert sorted(off_grpc) == sorted(framed) == list(range(len(requests)))
    for sample_id, sample in off_grpc.items():
        other = framed[sample_id]
        assert sample.tensor.shape == (len(requests[sample_id].token_ids), len(SERVED_LAYERS), HIDDEN_SIZE)
        assert sample.tensor.dtype == other.tensor.dtype
        assert torch.equal(sample.tensor.view(torch.uint8), other.tensor.view(torch.uint8))
        assert (sample.layer_ids, sample.token_ids_sha256) == (other.layer_ids, other.token_ids_sha256)


def test_refused_connections_leave_the_bound_stream_alone(stub, server, verifier_path):
    listener = server.payload_listener
    assert listener is not None
    source = GrpcSource([server.address], target_layer_ids=TARGET_LAYERS, streams_per_endpoint=1)
    try:
        generator = torch.Generator().manual_seed(5)
        requests = [
            SampleRequest(sample_id=i, input_ids=torch.randint(0, VOCAB, (10 + i,), generator=generator))
            for i in range(30)
        ]
        wait_until(lambda: listener.bound == 1)
        first = source.extract(requests[:10])
        refused_before = listener.refused
        with pytest.raises(PayloadChannelError, match="closed in the middle of the handshake reply"):
            payload_channel.connect("127.0.0.1", server.payload_port, new_token())  # a token nobody sent
        with socket.create_connection(("127.0.0.1", server.payload_port)) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            garbage.settimeout(CALL_TIMEOUT_S)
            try:
                answer = garbage.recv(16)
            except ConnectionResetError:  # closed with our unread bytes still queued: a reset
                answer = b""
            assert answer == b"", "the service answered garbage instead of closing"
        # A call waiting for its connection is not taken by a wrong token, and once bound, not by
        # a second connection presenting its own (a replayed token) either.
        waiting = SideChannelCall(stub, [request(100 + i, 5 + i) for i in range(3)], connect=False)
        try:
            with pytest.raises(PayloadChannelError, match="closed in the middle of the handshake reply"):
                payload_channel.connect("127.0.0.1", server.payload_port, new_token())
            waiting.connect()
            with pytest.raises(PayloadChannelError):
                payload_channel.connect("127.0.0.1", server.payload_port, waiting.token)
            assert sorted(waiting.samples()) == [100, 101, 102]
        finally:
            waiting.close()
        wait_until(lambda: listener.refused >= refused_before + 4)
        assert listener.refused == refused_before + 4
        rest = source.extract(requests[10:])
        endpoint = source._endpoints[0]
        # The stream was bound before the first request: nothing went in-band, nothing was lost.
        assert endpoint.delivered_on_payload_channel == endpoint.delivered == 30
        assert endpoint.payload_connections == 1
    finally:
        source.close()
    assert [s.sample_id for s in first + rest] == list(range(30))


def test_a_client_that_never_reads_its_connection_costs_a_bounded_number_of_samples(verifier_path):
    max_pending = 4
    tokens = 1024  # 1024 x 3 layers x 128 x 4 bytes = 1.5 MiB per sample
    sample_bytes = tokens * len(SERVED_LAYERS) * HIDDEN_SIZE * 4
    # Beyond max_pending, samples fully written into the kernel's socket buffers free their slots:
    # the service's send buffer grows to at most tcp_wmem's maximum, and the client pins its
    # receive buffer small below. An unbounded service computes all 200 within the wait.
    send_buffer_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    slack = -(-send_buffer_max // sample_bytes) + 1
    with (
        running_service(
            verifier_path, target_layer_ids=TARGET_LAYERS, max_pending_per_stream=max_pending
        ) as lone,
        open_channel(lone.address) as channel,
    ):
        stub = pb_grpc.HiddenStatesStub(channel)
        requests = [
            pb.ExtractRequest(sample_id=i, token_ids=[5] * tokens, layer_ids=SERVED_LAYERS)
            for i in range(200)
        ]
        stalled = SideChannelCall(stub, requests, rcvbuf=16 << 10)
        try:
            wait_until(lambda: lone.scheduler.samples_served >= max_pending)
            time.sleep(2.0)  # an unbounded service computes all 200 meanwhile (milliseconds each)
            served = lone.scheduler.samples_served
            assert max_pending <= served <= max_pending + slack, (
                f"{served} computed for a client reading none"
            )
        finally:
            stalled.close()  # cancelling wakes the send blocked on the full connection
        # The service goes on serving other calls on the side channel.
        fresh = SideChannelCall(stub, [pb.ExtractRequest(sample_id=1, token_ids=[1, 2], layer_ids=[1])])
        try:
            assert sorted(fresh.samples()) == [1]
        finally:
            fresh.close()


def test_a_service_without_a_payload_port_says_so_and_serves_in_band(verifier_path):
    with running_service(verifier_path, target_layer_ids=TARGET_LAYERS, payload_port=0) as plain:
        assert plain.payload_listener is None
        with open_channel(plain.address) as channel:
            stub = pb_grpc.HiddenStatesStub(channel)
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=CALL_TIMEOUT_S).payload_port == 0
            call = stub.Extract(
                iter([request(1, 6)]),
                metadata=((PAYLOAD_TOKEN_KEY, new_token().hex()),),
                timeout=CALL_TIMEOUT_S,
            )
            assert PAYLOAD_PORT_KEY not in dict(call.initial_metadata())
            frames = list(call)
    assert frames and all(len(f.data) for f in frames)


def test_a_malformed_token_is_invalid_argument(stub):
    call = stub.Extract(iter([request(1, 4)]), metadata=((PAYLOAD_TOKEN_KEY, "zz"),), timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert PAYLOAD_TOKEN_KEY in raised.value.details()
