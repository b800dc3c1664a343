"""Tensors on the wire: raw little-endian bytes, a small header, frames under the message limit.

The server encodes each sample's hidden states with `encode_sample` (one header on frame 0, then
the bytes cut into frames); the client feeds every `ExtractResponse` to a `FrameAssembler`, which
hands back a `DecodedSample` once all its frames arrived. Frames of different samples may
interleave. Nothing here is pickled and nothing is trusted: sizes, dtypes and frame order are all
checked, and a malformed stream raises `WireError` naming the sample.

Fast path (both ends, same bytes on the wire): the service sends `encode_sample_frames` (payload
copied once), a client deserializes with `parse_frame` (payload stays a view of the received
bytes) and gives its assemblers one `SampleBuffers`, so samples land in reused memory.

The payload side channel (`payload_channel.py`) sends the same `TensorHeader` and the same raw
bytes without frames; `check_header` and `decoded_sample` are shared with it.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dflash_core.wire.pb import hidden_states_pb2 as pb

# Well under gRPC's default 4 MiB limit would cost a message per 4 MiB; both ends raise the
# limit to MAX_MESSAGE_BYTES instead and frames stay a safe margin below it.
DEFAULT_FRAME_BYTES = 8 << 20
MAX_MESSAGE_BYTES = 64 << 20

WIRE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("the hidden-state wire format is little-endian; this host is not")


class WireError(ValueError):
    """A response stream that does not decode: wrong sizes, unknown dtype, frames out of order."""


def token_ids_digest(token_ids: Sequence[int] | torch.Tensor) -> bytes:
    """sha256 of the token ids as little-endian int32: what a response says it was computed for."""
    ids = torch.as_tensor(token_ids, dtype=torch.int32).flatten().contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).digest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bf16 included, which numpy lacks)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def tensor_header(
    sample_id: int,
    tensor: torch.Tensor,
    *,
    token_ids: Sequence[int] | torch.Tensor,
    layer_ids: Sequence[int],
) -> pb.TensorHeader:
    """What a receiver needs to rebuild `tensor` from its raw bytes, and what it was computed for."""
    if tensor.dtype not in DTYPE_NAMES:
        raise WireError(f"sample {sample_id}: dtype {tensor.dtype} has no wire name")
    return pb.TensorHeader(
        dtype=DTYPE_NAMES[tensor.dtype],
        shape=list(tensor.shape),
        layer_ids=list(layer_ids),
        token_ids_sha256=token_ids_digest(token_ids),
        num_bytes=tensor.numel() * tensor.element_size(),
    )


def encode_sample_frames(
    sample_id: int,
    tensor: torch.Tensor,
    *,
    token_ids: Sequence[int] | torch.Tensor,
    layer_ids: Sequence[int],
    max_frame_bytes: int = DEFAULT_FRAME_BYTES,
) -> Iterator[bytes]:
    """The serialized `ExtractResponse` frames of one sample's hidden states [t, len(layer_ids), H].

    Each frame is the small fields, serialized by protobuf, followed by field 5 (`data`) written
    by hand: tag, length, then the tensor's bytes copied once. Building the message and then
    serializing it would copy the payload three times (bytes(), the message, the output), which
    capped the service at ~0.5 GB/s; this is ordinary protobuf wire format (fields in number
    order), so any client parses it.
    """
    header = tensor_header(sample_id, tensor, token_ids=token_ids, layer_ids=layer_ids)
    data = tensor_bytes(tensor) if tensor.numel() else memoryview(b"")
    num_bytes = len(data)
    num_frames = max(1, -(-num_bytes // max_frame_bytes))
    for index in range(num_frames):
        chunk = data[index * max_frame_bytes : (index + 1) * max_frame_bytes]
        head = pb.ExtractResponse(
            sample_id=sample_id,
            header=header if index == 0 else None,
            frame_index=index,
            num_frames=num_frames,
        ).SerializeToString()
        yield b"".join((head, _DATA_TAG, _varint(len(chunk)), chunk))


def encode_sample(
    sample_id: int,
    tensor: torch.Tensor,
    *,
    token_ids: Sequence[int] | torch.Tensor,
    layer_ids: Sequence[int],
    max_frame_bytes: int = DEFAULT_FRAME_BYTES,
) -> Iterator[pb.ExtractResponse]:
    """`encode_sample_frames` as parsed messages (what any protobuf client sees)."""
    for frame in encode_sample_frames(
        sample_id, tensor, token_ids=token_ids, layer_ids=layer_ids, max_frame_bytes=max_frame_bytes
    ):
        yield pb.ExtractResponse.FromString(frame)


# ExtractResponse.data is field 5, length-delimited: tag (5 << 3) | 2.
_DATA_FIELD = 5
_DATA_TAG = bytes([(_DATA_FIELD << 3) | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(buffer):
            raise WireError("truncated varint in a response frame")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


@dataclass
class Frame:
    """An `ExtractResponse` whose `data` is a zero-copy view of the received bytes."""

    sample_id: int = 0
    header: pb.TensorHeader | None = None
    frame_index: int = 0
    num_frames: int = 0
    data: memoryview | bytes = b""
    error: pb.SampleError | None = None

    def HasField(self, name: str) -> bool:  # the protobuf message's spelling: one code path for both
        return getattr(self, name) is not None


def parse_frame(raw: bytes) -> Frame:
    """Parse a serialized `ExtractResponse` without copying its payload (the client's deserializer).

    Accepts any valid encoding of the message (any field order, unknown fields skipped); only the
    small fields are materialised, `data` stays a view of `raw`.
    """
    buffer = memoryview(raw)
    frame = Frame()
    position = 0
    while position < len(buffer):
        key, position = _read_varint(buffer, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(buffer, position)
            if field == 1:
                frame.sample_id = value
            elif field == 3:
                frame.frame_index = value
            elif field == 4:
                frame.num_frames = value
        elif wire_type == 2:
            length, position = _read_varint(buffer, position)
            if position + length > len(buffer):
                raise WireError(f"a response frame's field {field} runs past its end")
            value = buffer[position : position + length]
            position += length
            if field == 2:
                frame.header = pb.TensorHeader.FromString(value.tobytes())
            elif field == _DATA_FIELD:
                frame.data = value
            elif field == 6:
                frame.error = pb.SampleError.FromString(value.tobytes())
        elif wire_type == 5:
            position += 4
        elif wire_type == 1:
            position += 8
        else:
            raise WireError(f"a response frame has wire type {wire_type}, which ExtractResponse never uses")
    return frame


def error_response(sample_id: int, code: int, message: str) -> pb.ExtractResponse:
    return pb.ExtractResponse(sample_id=sample_id, error=pb.SampleError(code=code, message=message))


@dataclass
class DecodedSample:
    sample_id: int
    tensor: torch.Tensor  # [t, len(layer_ids), H] in the wire dtype
    layer_ids: list[int]
    token_ids_sha256: bytes


# Pooled buffers come in whole MiB, so samples of nearby lengths share them.
_BUFFER_GRANULE = 1 << 20


class SampleBuffers:
    """Sample memory a client reuses once no tensor views it any more; at most `max_bytes` pooled.

    Every sample is copied out of its frames into a buffer of its own. A fresh buffer costs the
    kernel a page fault and a zeroed page per 4 KiB (16k of them for a 64 MiB sample), the
    largest part of the client's CPU per byte. With reuse one stream of 64 MiB samples went from
    1.25 to 1.97 GB/s on a 16-core host and from 0.98 to 1.32 GB/s on 2 cores (docs/benchmarks.md).

    A buffer is free again when only the pool refers to it: `torch.frombuffer` holds a single
    reference to its bytearray for as long as any tensor (view, slice, numpy array) shares that
    storage, and drops it with the last one. Buffers in use count against `max_bytes` too, so
    give a client more than the bytes it keeps in flight; past the limit `take` hands out
    ordinary unpooled buffers. Thread-safe: one pool serves all streams of a client.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    @property
    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(len(buffer) for buffer in self._buffers)

    def take(self, num_bytes: int) -> torch.Tensor:
        """A writable uint8 [num_bytes] tensor that no other tensor shares; its contents are stale."""
        if num_bytes < _BUFFER_GRANULE:  # malloc's heap already reuses small blocks without faults
            return torch.empty(num_bytes, dtype=torch.uint8)
        with self._lock:
            index = self._best_free(num_bytes)
            if index is None:
                index = self._grow(num_bytes)
            if index is None:
                return torch.empty(num_bytes, dtype=torch.uint8)
            return torch.frombuffer(self._buffers[index], dtype=torch.uint8, count=num_bytes)

    def _free(self, index: int) -> bool:
        # The list's reference and getrefcount's own argument: nothing else holds the buffer.
        # (Indices, not loop variables, so no extra reference blurs the count.)
        return sys.getrefcount(self._buffers[index]) == 2

    def _best_free(self, num_bytes: int) -> int | None:
        """The smallest free buffer that fits, and not one more than twice the size needed."""
        best = None
        for index in range(len(self._buffers)):
            size = len(self._buffers[index])
            fits = num_bytes <= size <= 2 * num_bytes
            if fits and self._free(index) and (best is None or size < len(self._buffers[best])):
                best = index
        return best

    def _grow(self, num_bytes: int) -> int | None:
        size = -(-num_bytes // _BUFFER_GRANULE) * _BUFFER_GRANULE
        pooled = sum(len(buffer) for buffer in self._buffers)
        for index in reversed(range(len(self._buffers))):  # make room: drop free buffers
            if pooled + size <= self.max_bytes:
                break
            if self._free(index):
                pooled -= len(self._buffers.pop(index))
        if pooled + size > self.max_bytes:
            return None
        self._buffers.append(bytearray(size))
        return len(self._buffers) - 1


@dataclass
class _Partial:
    header: pb.TensorHeader
    num_frames: int
    buffer: torch.Tensor  # uint8 [num_bytes]
    received_bytes: int = 0
    next_frame: int = 0


class FrameAssembler:
    """Reassembles samples from frames; one per stream (partial samples die with their stream).

    With `buffers`, samples land in reused memory (see `SampleBuffers`); without, each sample
    gets a fresh buffer.
    """

    def __init__(self, buffers: SampleBuffers | None = None) -> None:
        self._partial: dict[int, _Partial] = {}
        self._buffers = buffers

    def __len__(self) -> int:
        return len(self._partial)

    def add(self, response: pb.ExtractResponse | Frame) -> DecodedSample | None:
        """Feed one frame; returns the sample when this frame completes it. Errors are not frames."""
        sample_id = response.sample_id
        partial = self._partial.get(sample_id)
        if partial is None:
            if response.frame_index != 0 or not response.HasField("header"):
                raise WireError(f"sample {sample_id}: frame {response.frame_index} arrived before its header")
            partial = self._start(sample_id, response)
        elif response.frame_index != partial.next_frame:
            raise WireError(
                f"sample {sample_id}: frame {response.frame_index} arrived, expected {partial.next_frame}"
            )
        end = partial.received_bytes + len(response.data)
        if end > partial.buffer.numel():
            raise WireError(
                f"sample {sample_id}: frames carry more than the {partial.buffer.numel()} bytes announced"
            )
        # One copy out of the (read-only) protobuf bytes into the sample's own buffer.
        partial.buffer.numpy()[partial.received_bytes : end] = np.frombuffer(response.data, dtype=np.uint8)
        partial.received_bytes = end
        partial.next_frame += 1
        if partial.next_frame < partial.num_frames:
            return None
        del self._partial[sample_id]
        if partial.received_bytes != partial.buffer.numel():
            raise WireError(
                f"sample {sample_id}: {partial.received_bytes} bytes received, "
                f"{partial.buffer.numel()} announced"
            )
        return decoded_sample(sample_id, partial.header, partial.buffer)

    def _start(self, sample_id: int, response: pb.ExtractResponse | Frame) -> _Partial:
        header = response.header
        check_header(sample_id, header)
        if response.num_frames < 1:
            raise WireError(f"sample {sample_id}: num_frames is {response.num_frames}")
        partial = _Partial(
            header=header,
            num_frames=response.num_frames,
            buffer=(
                self._buffers.take(int(header.num_bytes))
                if self._buffers is not None
                else torch.empty(int(header.num_bytes), dtype=torch.uint8)
            ),
        )
        self._partial[sample_id] = partial
        return partial


def check_header(sample_id: int, header: pb.TensorHeader) -> int:
    """The payload bytes `header` announces; raises `WireError` unless dtype and shape agree with it."""
    if header.dtype not in WIRE_DTYPES:
        raise WireError(f"sample {sample_id}: unknown dtype {header.dtype!r}")
    itemsize = torch.empty((), dtype=WIRE_DTYPES[header.dtype]).element_size()
    numel = 1
    for size in header.shape:
        numel *= int(size)
    if numel * itemsize != header.num_bytes:
        raise WireError(
            f"sample {sample_id}: shape {list(header.shape)} of {header.dtype} is "
            f"{numel * itemsize} bytes, header says {header.num_bytes}"
        )
    return int(header.num_bytes)


def decoded_sample(sample_id: int, header: pb.TensorHeader, buffer: torch.Tensor) -> DecodedSample:
    """The sample whose raw bytes fill the uint8 [num_bytes] `buffer` (a view, no copy)."""
    tensor = buffer.view(WIRE_DTYPES[header.dtype]).view(*[int(s) for s in header.shape])
    return DecodedSample(
        sample_id=sample_id,
        tensor=tensor,
        layer_ids=[int(i) for i in header.layer_ids],
        token_ids_sha256=bytes(header.token_ids_sha256),
    )


def check_finite_nonzero(tensor: torch.Tensor, *, what: str) -> str | None:
    """None when `tensor` is usable data; otherwise the reason (NaN/Inf/all zero are never data)."""
    if tensor.numel() == 0:
        return f"{what} is empty"
    # One fused pass over the data: min and max propagate NaN, an Inf lands in one of them, and
    # only all-zero data has both at 0. `isfinite().all()` plus `any()` took 124 ms per 64 MiB
    # sample on 2 cores (a cap of 0.5 GB/s on both the service and the trainer); this takes 2-4 ms.
    low, high = (float(x) for x in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(tensor)).sum())  # bad data only: the count goes in the message
        return f"{what} has {bad} NaN/Inf values"
    if low == 0 and high == 0:
        return f"{what} is all zeros"
    return None
