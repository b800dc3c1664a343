"""Tests for dflash_core.wire.codec: tensors to frames and back, and every way a stream can be wrong.

What must hold (docs/architecture.md): bytes are little-endian with dtype and shape in a header on frame 0;
a sample split into many frames, or interleaved with another sample's frames, comes back bit for
bit; a malformed stream raises WireError naming the sample; the token digest is sha256 of the ids
as little-endian int32; NaN, Inf and all-zero tensors are caught before training on them.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from dflash_core.wire.codec import (
    FrameAssembler,
    SampleBuffers,
    WireError,
    check_finite_nonzero,
    check_header,
    decoded_sample,
    encode_sample,
    encode_sample_frames,
    parse_frame,
    tensor_header,
    token_ids_digest,
)
from dflash_core.wire.pb import hidden_states_pb2 as pb

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYER_IDS = [4, 1, 2]  # deliberately not ascending: the header keeps the requested order


def sample_tensor(num_tokens: int, dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    """[t, len(LAYER_IDS), H] with values every wire dtype can tell apart."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, len(LAYER_IDS), 24, generator=generator).to(dtype)


def frames_of(
    sample_id: int, tensor: torch.Tensor, *, max_frame_bytes: int = 1 << 20
) -> list[pb.ExtractResponse]:
    token_ids = list(range(sample_id, sample_id + tensor.shape[0]))
    return list(
        encode_sample(
            sample_id, tensor, token_ids=token_ids, layer_ids=LAYER_IDS, max_frame_bytes=max_frame_bytes
        )
    )


def assemble(frames: list[pb.ExtractResponse]) -> dict[int, object]:
    assembler = FrameAssembler()
    done = {}
    for frame in frames:
        sample = assembler.add(frame)
        if sample is not None:
            done[sample.sample_id] = sample
    assert len(assembler) == 0, "every sample must be complete at the end of its frames"
    return done


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_frame_round_trip_is_bit_exact(dtype):
    tensor = sample_tensor(7, dtype)
    frames = frames_of(3, tensor)
    assert len(frames) == 1 and frames[0].num_frames == 1 and frames[0].HasField("header")
    header = frames[0].header
    assert list(header.shape) == [7, 3, 24]
    assert list(header.layer_ids) == LAYER_IDS
    assert header.num_bytes == tensor.numel() * tensor.element_size()
    sample = assemble(frames)[3]
    assert sample.tensor.dtype == dtype
    assert sample.layer_ids == LAYER_IDS
    assert sample.token_ids_sha256 == token_ids_digest(list(range(3, 10)))
    # Bit-exact, NaN-safe comparison of the raw bits (bf16 has no numpy dtype, so view as int16).
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(sample.tensor.view(bits), tensor.view(bits))


def test_bytes_on_the_wire_are_little_endian_with_the_dtype_named():
    # A round trip alone would pass with a symmetric big-endian bug; pin the actual bytes.
    tensor = torch.tensor([[[1.0, -2.5]]], dtype=torch.float32)
    (frame,) = frames_of(0, tensor)
    assert frame.header.dtype == "float32"
    assert frame.data == struct.pack("<2f", 1.0, -2.5)
    (half,) = frames_of(0, tensor.to(torch.float16))
    assert half.header.dtype == "float16"
    assert half.data == struct.pack("<2e", 1.0, -2.5)
    (bf16,) = frames_of(0, tensor.to(torch.bfloat16))
    assert bf16.header.dtype == "bfloat16"
    # bf16 is the top half of the float32 bit pattern.
    assert bf16.data == struct.pack("<2H", 0x3F80, 0xC020)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_frames_round_trip(dtype):
    tensor = sample_tensor(50, dtype, seed=1)
    num_bytes = tensor.numel() * tensor.element_size()
    max_frame_bytes = 1000  # not a multiple of the element size: frames cut through elements
    frames = frames_of(9, tensor, max_frame_bytes=max_frame_bytes)
    assert len(frames) == -(-num_bytes // max_frame_bytes) > 5
    assert [f.frame_index for f in frames] == list(range(len(frames)))
    assert all(f.num_frames == len(frames) for f in frames)
    assert all(len(f.data) <= max_frame_bytes for f in frames)
    # The header travels once, on frame 0; later frames are only bytes.
    assert frames[0].HasField("header") and not any(f.HasField("header") for f in frames[1:])
    sample = assemble(frames)[9]
    assert torch.equal(sample.tensor, tensor)


def test_frames_of_two_samples_interleaved():
    first, second = sample_tensor(30, torch.bfloat16, seed=2), sample_tensor(20, torch.bfloat16, seed=3)
    a, b = frames_of(1, first, max_frame_bytes=512), frames_of(2, second, max_frame_bytes=512)
    assert len(a) > 3 and len(b) > 3
    interleaved = []
    for i in range(max(len(a), len(b))):
        interleaved += a[i : i + 1] + b[i : i + 1]
    done = assemble(interleaved)
    assert torch.equal(done[1].tensor, first)
    assert torch.equal(done[2].tensor, second)
    assert done[1].token_ids_sha256 != done[2].token_ids_sha256


def test_assembler_returns_the_sample_only_on_its_last_frame():
    frames = frames_of(5, sample_tensor(10, torch.float32), max_frame_bytes=256)
    assembler = FrameAssembler()
    results = [assembler.add(f) for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] is not None and len(assembler) == 0


def test_encode_refuses_a_dtype_without_a_wire_name():
    with pytest.raises(WireError, match="sample 6"):
        frames_of(6, torch.zeros(2, 3, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------- malformed streams


def test_frame_before_header_names_the_sample():
    frames = frames_of(11, sample_tensor(20, torch.float32), max_frame_bytes=256)
    with pytest.raises(WireError, match=r"sample 11: frame 1 arrived before its header"):
        FrameAssembler().add(frames[1])


def test_frame_zero_without_header_is_refused():
    frames = frames_of(12, sample_tensor(20, torch.float32), max_frame_bytes=256)
    frames[0].ClearField("header")
    with pytest.raises(WireError, match="sample 12"):
        FrameAssembler().add(frames[0])


@pytest.mark.parametrize("order", [[0, 2], [0, 1, 1], [0, 1, 0]], ids=["skipped", "repeated", "restarted"])
def test_out_of_order_frame_names_the_sample(order):
    frames = frames_of(13, sample_tensor(20, torch.float32), max_frame_bytes=256)
    assembler = FrameAssembler()
    for index in order[:-1]:
        assembler.add(frames[index])
    with pytest.raises(WireError, match=rf"sample 13: frame {order[-1]} arrived, expected {order[-2] + 1}"):
        assembler.add(frames[order[-1]])


@pytest.mark.parametrize("padded_frame", [0, 1], ids=["only-frame", "middle-frame"])
def test_more_bytes_than_announced_names_the_sample(padded_frame):
    tensor = sample_tensor(20, torch.float32)
    frames = frames_of(14, tensor, max_frame_bytes=256 if padded_frame else 1 << 20)
    frames[padded_frame].data = frames[padded_frame].data + b"\x00"
    # The surplus shows once the bytes outgrow the buffer: on the padded frame or a later one.
    with pytest.raises(WireError, match=r"sample 14: frames carry more than the 5760 bytes announced"):
        assemble(frames)


def test_fewer_bytes_than_announced_names_the_sample():
    frames = frames_of(15, sample_tensor(20, torch.float32), max_frame_bytes=256)
    frames[-1].data = frames[-1].data[:-4]
    with pytest.raises(WireError, match=r"sample 15: \d+ bytes received, \d+ announced"):
        assemble(frames)


def test_shape_and_num_bytes_disagreeing_names_the_sample():
    (frame,) = frames_of(16, sample_tensor(4, torch.float32))
    frame.header.shape[0] = 5  # one token more than the bytes hold
    with pytest.raises(WireError, match=r"sample 16: shape \[5, 3, 24\] of float32 is 1440 bytes"):
        FrameAssembler().add(frame)


def test_unknown_dtype_names_the_sample():
    (frame,) = frames_of(17, sample_tensor(4, torch.float32))
    frame.header.dtype = "float64"
    with pytest.raises(WireError, match=r"sample 17: unknown dtype 'float64'"):
        FrameAssembler().add(frame)


def test_zero_frames_announced_names_the_sample():
    (frame,) = frames_of(18, sample_tensor(4, torch.float32))
    frame.num_frames = 0
    with pytest.raises(WireError, match="sample 18: num_frames is 0"):
        FrameAssembler().add(frame)


# ---------------------------------------------------------------------------- echo checks


def test_token_digest_is_sha256_of_little_endian_int32():
    ids = [0, 1, 383, 70000]
    expected = hashlib.sha256(struct.pack("<4i", *ids)).digest()
    assert token_ids_digest(ids) == expected
    # The same ids as any integer tensor give the same digest (the server holds int64 tensors).
    assert token_ids_digest(torch.tensor(ids, dtype=torch.int64)) == expected
    assert token_ids_digest(torch.tensor([ids], dtype=torch.int32)) == expected


def test_token_digest_tells_different_ids_apart():
    digests = {token_ids_digest(ids) for ids in ([1, 2, 3], [3, 2, 1], [1, 2], [1, 2, 3, 0], [1, 2, 4])}
    assert len(digests) == 5


def test_check_finite_nonzero_accepts_data():
    assert check_finite_nonzero(torch.randn(3, 2, 4), what="x") is None
    # One non-zero value is enough to be data.
    tensor = torch.zeros(3, 2, 4, dtype=torch.bfloat16)
    tensor[2, 1, 3] = 0.5
    assert check_finite_nonzero(tensor, what="x") is None


@pytest.mark.parametrize(
    ("bad_value", "reason"),
    [(float("nan"), "2 NaN/Inf values"), (float("inf"), "2 NaN/Inf values"), (-float("inf"), "NaN/Inf")],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_check_finite_nonzero_catches_nan_and_inf(bad_value, reason, dtype):
    tensor = torch.randn(4, 2, 8).to(dtype)
    tensor[1, 0, 3] = bad_value
    tensor[3, 1, 0] = bad_value
    problem = check_finite_nonzero(tensor, what="hidden states of sample 7")
    assert problem is not None and problem.startswith("hidden states of sample 7")
    assert reason in problem


def test_check_finite_nonzero_catches_all_zeros_and_empty():
    assert check_finite_nonzero(torch.zeros(4, 2, 8), what="x") == "x is all zeros"
    assert check_finite_nonzero(torch.zeros(0, 2, 8), what="x") == "x is empty"


# ---------------------------------------------------------------------------- the fast path


def test_hand_written_frames_are_ordinary_protobuf_and_parse_without_copies():
    tensor = torch.randn(9, 2, 16).to(torch.bfloat16)
    frames = list(
        encode_sample_frames(5, tensor, token_ids=[1, 2, 3] * 3, layer_ids=[1, 4], max_frame_bytes=100)
    )
    assembler = FrameAssembler()
    done = None
    for raw in frames:
        standard = pb.ExtractResponse.FromString(raw)  # what any protobuf client sees
        fast = parse_frame(raw)
        assert (fast.sample_id, fast.frame_index, fast.num_frames) == (5, standard.frame_index, len(frames))
        assert bytes(fast.data) == standard.data and fast.HasField("header") == standard.HasField("header")
        done = assembler.add(fast) or done
    assert done is not None and torch.equal(done.tensor, tensor)


def test_parse_frame_reads_protobufs_own_serialization_and_errors():
    message = pb.ExtractResponse(sample_id=3, error=pb.SampleError(code=3, message="bad layer"))
    parsed = parse_frame(message.SerializeToString())
    assert parsed.sample_id == 3 and parsed.HasField("error") and parsed.error.message == "bad layer"
    assert not parsed.HasField("header")
    with pytest.raises(WireError, match="runs past its end"):
        parse_frame(bytes([0x2A, 0x10, 0x01]))  # data field announces 16 bytes, carries 1


# ---------------------------------------------------------------------------- buffer reuse

MIB = 1 << 20


def test_sample_buffers_reuse_memory_only_once_no_tensor_views_it():
    pool = SampleBuffers(max_bytes=8 * MIB)
    first = pool.take(2 * MIB)
    view = first[10:20].view(torch.int16)  # a view keeps the storage alive
    del first
    second = pool.take(2 * MIB)
    assert second.data_ptr() != view.data_ptr() - 10  # still in use: a new buffer
    address = view.data_ptr() - 10
    del view
    third = pool.take(2 * MIB)
    assert third.data_ptr() == address  # free again: reused
    assert pool.pooled_bytes == 4 * MIB


def test_sample_buffers_past_the_limit_hand_out_ordinary_buffers_and_evict_free_ones():
    pool = SampleBuffers(max_bytes=4 * MIB)
    held = [pool.take(2 * MIB), pool.take(2 * MIB)]
    extra = pool.take(2 * MIB)  # over the limit while both are held: unpooled
    assert pool.pooled_bytes == 4 * MIB and extra.numel() == 2 * MIB
    held.clear()
    big = pool.take(3 * MIB)  # the free 2 MiB buffers are dropped to make room
    assert pool.pooled_bytes <= 4 * MIB and big.numel() == 3 * MIB
    small = pool.take(1000)  # small samples bypass the pool
    assert small.numel() == 1000 and pool.pooled_bytes <= 4 * MIB


def test_assembler_with_a_pool_reassembles_the_same_tensor():
    tensor = torch.randn(300, 2, 1024).to(torch.bfloat16)  # 1.2 MiB: pooled
    assembler = FrameAssembler(SampleBuffers(8 * MIB))
    done = None
    for frame in encode_sample_frames(
        1, tensor, token_ids=[1] * 300, layer_ids=[1, 2], max_frame_bytes=MIB // 2
    ):
        done = assembler.add(parse_frame(frame)) or done
    assert done is not None and torch.equal(done.tensor, tensor)


def test_the_side_channels_header_is_frame_zeros_header_and_rebuilds_the_tensor():
    # The payload side channel sends `tensor_header` and the raw bytes without frames; what it
    # rebuilds must be what the frames give (same header, same dtype, shape and bits).
    tensor = sample_tensor(17, torch.bfloat16, seed=3)
    header = tensor_header(5, tensor, token_ids=range(5, 22), layer_ids=LAYER_IDS)  # as frames_of
    assert header == frames_of(5, tensor)[0].header
    assert check_header(5, header) == tensor.numel() * 2
    raw = torch.frombuffer(bytearray(tensor.view(torch.uint8).flatten().numpy().tobytes()), dtype=torch.uint8)
    sample = decoded_sample(5, header, raw)
    assert torch.equal(sample.tensor, tensor) and sample.tensor.dtype == torch.bfloat16
    assert sample.layer_ids == LAYER_IDS and sample.token_ids_sha256 == token_ids_digest(range(5, 22))
    header.num_bytes += 2
    with pytest.raises(WireError, match="sample 5: shape"):
        check_header(5, header)
