"""The payload side channel: a sample's raw bytes on a plain TCP connection beside its Extract call.

Negotiated on the call (docs/architecture.md): the token in `PAYLOAD_TOKEN_KEY` metadata ties one
connection to exactly one call (it is no secret from whoever can read the network). Little-endian:

    client -> service, once:     MAGIC | VERSION (u8) | token (TOKEN_BYTES)
    service -> client, once:     MAGIC | ACK (u8)            (or the connection closes: refused)
    service -> client, repeated: kind (u8) | header length (u32) | header | payload
        RECORD_SAMPLE: a serialized `ExtractResponse` (frame 0 of 1, no data), then its
                       `TensorHeader.num_bytes` raw bytes, received with `recv_into`
        RECORD_END:    no header, no payload: the call ended cleanly

A connection that closes anywhere but after RECORD_END broke, and so did the whole call.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
from collections.abc import Sequence

import torch
from google.protobuf.message import DecodeError

from dflash_core.wire.codec import (
    DecodedSample,
    SampleBuffers,
    WireError,
    check_header,
    decoded_sample,
    tensor_bytes,
    tensor_header,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb

PAYLOAD_TOKEN_KEY = "dflash-payload-token"  # client -> service, call metadata: the token as hex
PAYLOAD_PORT_KEY = "dflash-payload-port"  # service -> client, initial metadata: the port to dial

MAGIC = b"DFPC"
VERSION = 1
TOKEN_BYTES = 16
ACK = 1
RECORD_SAMPLE = 1
RECORD_END = 2

_HANDSHAKE = struct.Struct(f"<{len(MAGIC)}sB{TOKEN_BYTES}s")
_REPLY = struct.Struct(f"<{len(MAGIC)}sB")
_RECORD = struct.Struct("<BI")
# A record header is a sample id, a shape, layer ids and a digest: a few hundred bytes. Anything
# far larger is not a header, and reading it would let a broken peer make us allocate at will.
MAX_HEADER_BYTES = 64 << 10


class PayloadChannelError(ConnectionError):
    """The side channel could not be set up, or its bytes do not follow the protocol."""


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def token_from_metadata(text: str) -> bytes:
    """The token of a `PAYLOAD_TOKEN_KEY` value; raises ValueError unless it is TOKEN_BYTES as hex."""
    token = bytes.fromhex(text)
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"{PAYLOAD_TOKEN_KEY} must be {TOKEN_BYTES} bytes as hex, got {len(token)} bytes")
    return token


def close(sock: socket.socket) -> None:
    """Shut down, then close: a shutdown also wakes another thread blocked on this socket."""
    with contextlib.suppress(OSError):  # not connected any more
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def tune(sock: socket.socket) -> None:
    # Records are written in two calls (header, payload) and END is tiny: without TCP_NODELAY
    # Nagle's algorithm may hold a short write back for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ------------------------------------------------------------------------------ the client's end


def connect(host: str, port: int, token: bytes, *, timeout_s: float = 5.0) -> socket.socket:
    """A connection to the service's payload port, bound to the call that announced `token`.

    Raises OSError when the port cannot be reached, `PayloadChannelError` when the service does
    not acknowledge the token within `timeout_s` (it closes the connection on a token it does not
    know). The socket comes back blocking, without a timeout: a stalled service is noticed by the
    gRPC call's keepalive, whose failure closes this connection.
    """
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        tune(sock)
        present_token(sock, token)
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def present_token(sock: socket.socket, token: bytes) -> None:
    """The handshake on a connected socket: send `token`, wait for the acknowledgement."""
    sock.sendall(_HANDSHAKE.pack(MAGIC, VERSION, token))
    reply = bytearray(_REPLY.size)
    _recv_exactly(sock, memoryview(reply), what="the handshake reply")
    magic, status = _REPLY.unpack(reply)
    if magic != MAGIC or status != ACK:
        raise PayloadChannelError(f"the service answered the handshake with {bytes(reply)!r}")


class RecordReader:
    """Reads records off one connection; payloads land in `buffers` (reused memory) by `recv_into`."""

    def __init__(self, sock: socket.socket, *, buffers: SampleBuffers | None, max_sample_bytes: int) -> None:
        self._sock = sock
        self._buffers = buffers
        self.max_sample_bytes = max_sample_bytes
        self._prefix = bytearray(_RECORD.size)

    def read(self) -> DecodedSample | None:
        """The next sample, or None after RECORD_END. Raises `PayloadChannelError` on a connection
        that closes mid-record or without RECORD_END, `WireError` on a malformed record."""
        count = self._sock.recv_into(self._prefix)
        if count == 0:
            raise PayloadChannelError("the service closed the payload connection without ending the call")
        _recv_exactly(self._sock, memoryview(self._prefix), what="a record", already=count)
        kind, header_bytes = _RECORD.unpack(self._prefix)
        if kind == RECORD_END:
            return None
        if kind != RECORD_SAMPLE or header_bytes > MAX_HEADER_BYTES:
            raise WireError(f"payload record of kind {kind} with a {header_bytes}-byte header")
        raw = bytearray(header_bytes)
        _recv_exactly(self._sock, memoryview(raw), what="a record header")
        try:
            head = pb.ExtractResponse.FromString(bytes(raw))
        except DecodeError as exc:
            raise WireError(f"a payload record's header does not parse: {exc}") from None
        sample_id = head.sample_id
        if not head.HasField("header"):
            raise WireError(f"sample {sample_id}: a payload record without a tensor header")
        num_bytes = check_header(sample_id, head.header)
        if num_bytes > self.max_sample_bytes:
            raise WireError(
                f"sample {sample_id}: {num_bytes} bytes announced, more than any request may get "
                f"({self.max_sample_bytes})"
            )
        buffer = (
            self._buffers.take(num_bytes)
            if self._buffers is not None
            else torch.empty(num_bytes, dtype=torch.uint8)
        )
        # The one copy: kernel socket buffer -> the sample's memory.
        _recv_exactly(self._sock, memoryview(buffer.numpy()), what=f"sample {sample_id}'s payload")
        return decoded_sample(sample_id, head.header, buffer)


def _recv_exactly(sock: socket.socket, view: memoryview, *, what: str, already: int = 0) -> None:
    filled = already
    while filled < len(view):
        # MSG_WAITALL: the kernel fills the whole rest in one call (fewer wake-ups for a 64 MiB
        # payload); it still returns early on a signal or a closed connection, hence the loop.
        count = sock.recv_into(view[filled:], 0, socket.MSG_WAITALL)
        if count == 0:
            raise PayloadChannelError(
                f"the payload connection closed in the middle of {what} ({filled} of {len(view)} bytes)"
            )
        filled += count


# ----------------------------------------------------------------------------- the service's end


def read_handshake(sock: socket.socket) -> bytes:
    """The token a new connection presents (the caller sets the timeout); raises
    `PayloadChannelError` on anything but a well-formed handshake of this version."""
    raw = bytearray(_HANDSHAKE.size)
    _recv_exactly(sock, memoryview(raw), what="the handshake")
    magic, version, token = _HANDSHAKE.unpack(raw)
    if magic != MAGIC:
        raise PayloadChannelError(f"not a payload-channel handshake (starts {bytes(raw[:8])!r})")
    if version != VERSION:
        raise PayloadChannelError(f"payload-channel version {version}, this service speaks {VERSION}")
    return token


def send_ack(sock: socket.socket) -> None:
    sock.sendall(_REPLY.pack(MAGIC, ACK))


def send_sample(
    sock: socket.socket,
    sample_id: int,
    tensor: torch.Tensor,
    *,
    token_ids: Sequence[int] | torch.Tensor,
    layer_ids: Sequence[int],
) -> None:
    """One RECORD_SAMPLE: the header, then the tensor's bytes straight from its memory (no copy in
    Python; `sendall` releases the GIL while the kernel copies)."""
    header = tensor_header(sample_id, tensor, token_ids=token_ids, layer_ids=layer_ids)
    head = pb.ExtractResponse(sample_id=sample_id, header=header, frame_index=0, num_frames=1)
    raw = head.SerializeToString()
    sock.sendall(_RECORD.pack(RECORD_SAMPLE, len(raw)) + raw)
    if tensor.numel():
        sock.sendall(tensor_bytes(tensor))


def send_end(sock: socket.socket) -> None:
    sock.sendall(_RECORD.pack(RECORD_END, 0))
